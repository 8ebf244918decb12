"""What a worker says about its tasks: one line per task event, and a summary while busy.

The lines go to the ``qo.worker.tasks`` logger (``log``); each record carries the
event's fields as attributes (``extra=``): ``event``, ``task_id``, ``task_type``,
``queue``, ``attempt``, ``worker_id``, and where they apply ``duration_ms``, ``error``,
``traceback``, ``delay_s``. ``qo.cli.logs.JsonFormatter`` prints them as JSON fields;
the text format prints only the message, e.g.::

    task 0192f3c6a1b27e55 resize: started (attempt 1/4)
    task 0192f3c6a1b27e55 resize: completed in 12 ms
    task 0192f3c6a1b27e56 resize: retry 2/4 in 8 s: ValueError: no such image
    task 0192f3c6a1b27e57 resize: failed (dead letter) after 4 attempts: ValueError: ...

The summary (``qo.worker.summary``, every ``WorkerSettings.log_summary_interval``
seconds, only when a task started or ended in the interval)::

    worker host-1-ab12cd: 41.2 tasks/s over 10 s: 410 completed, 2 retried, 1 failed; 8 running

Logging is done where the worker stores each outcome (qo/worker.py), not through the
``qo_task_event`` hook: a plugin may be blocked, the worker's own output may not be.
"""

from __future__ import annotations

import collections
import logging
import traceback as tb_module
from typing import Any

from .model import Task

log = logging.getLogger("qo.worker.tasks")
summary_log = logging.getLogger("qo.worker.summary")

#: events that end an attempt (counted as "tasks" in the summary's rate)
ENDED = ("completed", "retried", "failed", "cancelled", "handed_back", "lease_lost", "expired")


def describe_error(error: BaseException | None) -> str:
    if error is None:
        return ""
    if isinstance(error, TimeoutError) and str(error).startswith("handler exceeded"):
        return f"TimeoutError: {error}"
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def format_traceback(error: BaseException) -> str:
    return "".join(tb_module.format_exception(type(error), error, error.__traceback__)).rstrip()


class TaskLog:
    """The per-task lines and the interval counters of one worker."""

    def __init__(self, worker_id: str, queue: str, clock: Any):
        self.worker_id = worker_id
        self.queue = queue
        self.clock = clock
        self.interval: collections.Counter[str] = collections.Counter()
        self.interval_started = clock.now()

    def _say(self, level: int, event: str, task: Task, message: str, *, exc_info: Any = None,
             **fields: Any) -> None:
        self.interval[event] += 1
        if not log.isEnabledFor(level):
            return
        where = "" if self.queue == "default" else f" (queue {self.queue})"  # else the start-up line says
        extra = {"event": event, "task_id": task.id, "task_type": task.task_type, "queue": self.queue,
                 "attempt": task.attempt, "worker_id": self.worker_id, **fields}
        log.log(level, "task %s %s%s: %s", task.id, task.task_type, where, message, exc_info=exc_info, extra=extra)

    @staticmethod
    def _attempts(task: Task) -> str:
        return f"{task.attempt}/{task.max_retries + 1}"

    # -- the events -----------------------------------------------------------------

    def started(self, task: Task) -> None:
        if not log.isEnabledFor(logging.INFO):  # counted only: no line to format (once per task)
            self.interval["started"] += 1
            return
        self._say(logging.INFO, "started", task, f"started (attempt {self._attempts(task)})")

    def completed(self, task: Task, seconds: float) -> None:
        if not log.isEnabledFor(logging.INFO):
            self.interval["completed"] += 1
            return
        ms = round(seconds * 1000)
        self._say(logging.INFO, "completed", task, f"completed in {ms} ms", duration_ms=ms)

    def timed_out(self, task: Task, timeout: float) -> None:
        self._say(logging.WARNING, "timed_out", task, f"timed out after {timeout:g} s",
                  duration_ms=round(timeout * 1000))

    def retried(self, task: Task, error: BaseException | None, seconds: float, delay: float) -> None:
        what = describe_error(error)
        self._say(logging.WARNING, "retried", task,
                  f"retry {task.attempt + 1}/{task.max_retries + 1} in {_seconds(delay)}" + (f": {what}" if what else ""),
                  duration_ms=round(seconds * 1000), delay_s=round(delay, 3), error=what)

    def failed(self, task: Task, error: BaseException | None, seconds: float | None) -> None:
        what = describe_error(error) or _stored_error(task)
        fields: dict[str, Any] = {"error": what}
        if seconds is not None:
            fields["duration_ms"] = round(seconds * 1000)
        exc_info = None
        if error is not None and error.__traceback__ is not None:  # a timeout has none worth showing
            fields["traceback"] = format_traceback(error)
            exc_info = (type(error), error, error.__traceback__)
        elif task.last_error and task.last_error.get("traceback"):
            fields["traceback"] = task.last_error["traceback"]
        n = task.attempt
        self._say(logging.ERROR, "failed", task,
                  f"failed (dead letter) after {n} attempt{'s' if n != 1 else ''}" + (f": {what}" if what else ""),
                  exc_info=exc_info, **fields)

    def cancelled(self, task: Task) -> None:
        self._say(logging.INFO, "cancelled", task, "cancelled (its cancel was requested while it ran)")

    def handed_back(self, task: Task) -> None:
        self._say(logging.INFO, "handed_back", task,
                  "handed back (the worker is stopping; the interrupted attempt is not counted)")

    def lease_lost(self, task: Task) -> None:
        self._say(logging.WARNING, "lease_lost", task,
                  f"lease lost (recovery took the task over): it may run again elsewhere; the result of "
                  f"attempt {task.attempt} is not written")

    def expired(self, task: Task) -> None:
        self._say(logging.INFO, "expired", task, "expired (reached after its expires_at; not run)")

    def recovered(self, task: Task) -> None:
        where = "requeued" if task.status == "pending" else f"now {task.status}"
        self._say(logging.WARNING, "recovered", task,
                  f"recovered from a worker that stopped heartbeating ({where})")

    # -- the summary ------------------------------------------------------------------

    def summary(self, running: int) -> str | None:
        """Log the interval's summary if anything started or ended in it; start a new one."""
        now = self.clock.now()
        counts, self.interval = self.interval, collections.Counter()
        elapsed, self.interval_started = max(now - self.interval_started, 1e-9), now
        ended = sum(counts[e] for e in ENDED)
        if not ended and not counts["started"]:
            return None
        rate = counts["completed"] / elapsed + sum(counts[e] for e in ("retried", "failed")) / elapsed
        parts = [f"{counts[e]} {e.replace('_', ' ')}" for e in ("started", *ENDED, "timed_out") if counts[e]]
        message = (f"worker {self.worker_id}: {rate:.1f} tasks/s over {_seconds(elapsed)}: {', '.join(parts)}; "
                   f"{running} running")
        summary_log.info(message, extra={
            "event": "summary", "worker_id": self.worker_id, "queue": self.queue, "interval_s": round(elapsed, 3),
            "tasks_per_s": round(rate, 3), "running": running,
            **{e: counts[e] for e in ("started", "completed", "retried", "failed", "timed_out")}})
        return message


def _seconds(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s" if s % 1 else f"{s:.0f} s"
    return f"{s:.0f} s"


def _stored_error(task: Task) -> str:
    err = task.last_error or {}
    if not err:
        return ""
    return f"{err.get('type', 'Error')}: {err.get('message', '')}".rstrip(": ")
