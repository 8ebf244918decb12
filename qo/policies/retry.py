"""Default retry policy: exponential backoff with full jitter, bounded by max_retries."""

from __future__ import annotations

import random

from qo.hookspecs import hookimpl

BASE_SECONDS = 1.0
CAP_SECONDS = 3600.0


@hookimpl
def qo_retry_delay(task, error):
    from qo.errors import Fail, Retry

    if isinstance(error, Fail):
        return -1
    if task.attempt > task.max_retries:
        return -1
    if isinstance(error, Retry) and error.delay is not None:
        return max(0.0, float(error.delay))
    ceiling = min(CAP_SECONDS, BASE_SECONDS * 2 ** max(0, task.attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
