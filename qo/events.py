"""Broadcasting task events to ``qo_task_event`` implementations, safely."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: "failed" is final (dead letter); "retried" is a failed attempt that will run again;
#: "recovered" is a task taken back from a worker that stopped renewing its lease;
#: "expired" is a task a worker reached after its expires_at: ended, never run.
EVENTS = ("submitted", "started", "succeeded", "failed", "retried", "cancelled", "recovered", "expired")


def emit(plugins: Any, event: str, task: Any) -> None:
    """Call every ``qo_task_event``; a plugin's exception is logged, never raised."""
    try:
        plugins.hook.qo_task_event(event=event, task=task)
    except Exception:
        log.exception("a qo_task_event plugin failed on %s of task %s", event, getattr(task, "id", "?"))
