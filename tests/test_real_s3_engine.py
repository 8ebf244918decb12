"""The engine's S3 scenarios on Ceph RGW and on LocalStack (started by the tests): the
same test functions as on moto, each given a fresh bucket on the real server.

Lifecycle, retry and dead letter, lease recovery, and a SIGKILLed worker's task
finishing elsewhere: the paths that failed on both servers before the S3 backend
learned their dialects (issue 27: RGW refused every quoted If-Match, LocalStack
answered a conditional DELETE 501).
"""

from __future__ import annotations

import pytest

from test_lifecycle import (  # noqa: F401  (collected here, on the real servers)
    test_cancel_pending_task_never_runs,
    test_failing_task_retries_then_dead_letters,
    test_submit_then_worker_completes_with_output,
)
from test_recovery import (  # noqa: F401
    test_a_task_that_keeps_killing_its_workers_ends_in_the_dead_letter,
    test_heartbeat_renews_every_lease_and_silence_loses_them,
    test_recovery_writes_the_marker_a_crashed_worker_never_wrote,
)
from test_worker_processes import test_sigkilled_worker_task_completes_elsewhere_after_lease  # noqa: F401


@pytest.fixture
def storage_url(real_s3_url: str) -> str:
    """conftest's fixture of the same name, on the real server under test."""
    return real_s3_url
