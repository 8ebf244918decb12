"""The worker-side state changes of a task: claim, complete, fail, requeue.

Every change is read, check, compare-and-swap. Worker-side changes write the task
first and its marker second: the worker's record names the task until both are done,
so if the worker dies in between, recovery finds the task through the record and
writes the marker (see docs/architecture.md, "write order").
"""

from __future__ import annotations

import traceback
from typing import Any, Awaitable, Callable

import attrs

from . import keys
from .errors import CorruptObject, Fail, PreconditionFailed, TaskNotFound
from .keys import Marker
from .model import COMPLETED, EXPIRED, FAILED, PENDING, RUNNING, TERMINAL, Task, iso
from .store import TaskStore


@attrs.frozen
class Claimed:
    task: Task
    etag: str


@attrs.frozen
class Expired:
    """The task behind the marker was due but not started before its ``expires_at``: it
    is now stored ``expired`` (``task``, version ``etag``) instead of running. The worker
    still owes its ``ended/`` index marker and the release of its dependents."""

    task: Task
    etag: str


@attrs.frozen
class Missed:
    """A marker that did not yield a claim. ``stale``: the marker no longer projects a
    claimable task (the task ended, runs elsewhere, or does not exist). ``dead``: it
    never will again (its task ended at the marker's own due time, and every way back to
    pending moves the due time: ``requeued_at``), so it can be deleted at once."""

    reason: str
    stale: bool
    missing: bool = False
    dead: bool = False
    #: the task object is unreadable (reported once where it was read)
    corrupt: bool = False
    #: never drop the marker: its task was written by a newer release, whose workers
    #: can run it
    keep: bool = False
    #: the marker the task should have instead (written before this one is dropped)
    repair: str | None = None


async def claim(
    store: TaskStore, marker: Marker, *, worker_id: str, lease_id: str, lease_ttl: float, now: float,
    gate: Callable[[Task, str], Awaitable[Missed | None]] | None = None,
) -> Claimed | Expired | Missed:
    """Claim the task behind ``marker`` by CAS: pending -> running under ``lease_id``.

    A task past its ``expires_at`` is CASed to ``expired`` instead (``Expired``), before
    ``gate`` runs: an expired task takes no rate-limit token. ``gate(task, etag)`` runs
    between the read and the CAS (rate limits): a Missed it returns is the outcome.
    """
    try:
        task, etag = await store.load(marker.task_id)
    except TaskNotFound:
        return Missed("task not found", stale=True, missing=True)
    except CorruptObject as exc:
        return Missed(f"task object unreadable: {exc.reason}", stale=True, corrupt=True,
                      keep=exc.newer)
    if task.task_type != marker.task_type:
        # a marker naming another type than its task's (a hand-edited task) is not its
        # projection: replace it by the task's own, which the right workers will see
        own = task.marker_key(store.queue, now) if task.status == PENDING else None
        return Missed(f"marker names type {marker.task_type!r}, the task is {task.task_type!r}",
                      stale=True, dead=True, repair=own)
    if task.status != PENDING:
        # e.g. a marker that aging moved, left behind by a cancel (which deletes the
        # marker at the task's own level); a marker written ahead of a retry's CAS
        # names a later due time and is not dead
        dead = task.status in TERMINAL and keys.ms(task.available_at) == keys.ms(marker.due)
        return Missed(f"task is {task.status}", stale=True, dead=dead)
    if keys.ms(task.available_at) != keys.ms(marker.due):
        # the ready marker is the statement "due" (made on its writer's clock); one
        # that names another due time is left over from an earlier state
        return Missed("marker does not match the task's due time", stale=True)
    if task.expires_at is not None and now >= task.expires_at:
        return await _expire(store, task, etag, now)
    if gate is not None:
        refused = await gate(task, etag)
        if refused is not None:
            return refused
    task.status = RUNNING
    task.attempt += 1
    task.lease_id = lease_id
    task.worker_id = worker_id
    task.lease_deadline = now + lease_ttl
    task.started_at = task.updated_at = now
    # our fresh lease id on a running task says a claim whose response was lost is ours
    stored = await replace_recognising(store, task, etag,
                                       lambda t: t.status == RUNNING and t.lease_id == lease_id)
    return Claimed(*stored) if stored is not None else Missed("lost the race", stale=False)


async def replace_recognising(store: TaskStore, task: Task, etag: str,
                              ours: Callable[[Task], bool]) -> tuple[Task, str] | None:
    """CAS ``task`` over ``etag``: the stored task and its etag, or None if we lost.

    A refusal after a failure whose outcome was unknown may hide our own landed write,
    changed since by another writer (a dependent's submitter setting has_dependents, a
    cancel): then the stored task is ours when ``ours(stored)`` says so."""
    try:
        return task, await store.replace(task, etag)
    except PreconditionFailed as exc:
        if not getattr(exc, "uncertain", False):
            return None
        try:
            current, etag = await store.load(task.id)
        except TaskNotFound:
            return None
        return (current, etag) if ours(current) else None


async def _expire(store: TaskStore, task: Task, etag: str, now: float) -> Expired | Missed:
    """CAS a pending task whose ``expires_at`` has passed to ``expired`` (terminal, no
    attempt counted). A lost race is a Missed like a lost claim: whoever won (a claim on
    a clock that said "not yet", a cancel) decided the task's fate."""
    task.status = EXPIRED
    task.finished_at = task.updated_at = now
    task.lease_id = task.lease_deadline = task.worker_id = None
    task.last_error = {"type": "Expired", "message": f"not started before expires_at {iso(task.expires_at)}",
                       "traceback": "", "attempt": task.attempt}
    stored = await replace_recognising(store, task, etag, lambda t: t.status == EXPIRED and t.finished_at == now)
    return Expired(*stored) if stored is not None else Missed("lost the race", stale=False)


async def finish(store: TaskStore, task: Task, etag: str, change: Any, now: float) -> tuple[Task, str] | None:
    """Apply ``change(task)`` to our running attempt by CAS, re-reading on conflict.

    Returns the stored task, or ``None`` when the lease was lost (another worker took
    the task over): then this attempt's result must not be written.
    """
    lease_id = task.lease_id
    while True:
        change(task)
        task.updated_at = now
        try:
            return task, await store.replace(task, etag)
        except PreconditionFailed:
            try:
                task, etag = await store.load(task.id)
            except TaskNotFound:
                return None
            if task.status != RUNNING or task.lease_id != lease_id:
                return None


def requeued_at(task: Task, when: float) -> float:
    """The due time of a task going back to pending: never its previous one.

    Markers are named by due time; a new state must get a new marker key, or the
    batched delete of the old marker (same key) could remove the new one.
    """
    return max(when, task.available_at + 0.001)


def completed(output: Any, now: float, output_ref: dict[str, Any] | None = None):
    """Completed with ``output`` inline, or stored apart under ``output_ref`` (qo/payloads.py)."""
    def change(task: Task) -> None:
        task.status, task.output, task.finished_at = COMPLETED, output, now
        task.output_ref = output_ref
        task.lease_id = task.lease_deadline = None
    return change


def error_record(error: BaseException, attempt: int) -> dict[str, Any]:
    tb = traceback.format_exception(type(error), error, error.__traceback__, limit=8)
    summary = "".join(tb)[-4000:]
    return {"type": type(error).__name__, "message": str(error)[:2000], "traceback": summary, "attempt": attempt}


def failed(error: BaseException, delay: float | None, now: float):
    """Dead letter when ``delay`` is None or negative or the task was cancelled; else retry."""

    def change(task: Task) -> None:
        task.last_error = error_record(error, task.attempt)
        task.lease_id = task.lease_deadline = None
        if delay is None or delay < 0 or isinstance(error, Fail) or task.cancel_requested:
            task.status, task.finished_at = (FAILED if not task.cancel_requested else "cancelled"), now
        else:
            task.status, task.available_at = PENDING, requeued_at(task, now + delay)
            task.worker_id = None
    return change


def handed_back(now: float):
    """A graceful shutdown returns the task without counting the interrupted attempt;
    a task whose cancel was requested while it ran ends ``cancelled`` instead."""

    def change(task: Task) -> None:
        task.lease_id = task.lease_deadline = task.worker_id = None
        if task.cancel_requested:
            task.status, task.finished_at = "cancelled", now
            return
        task.status, task.available_at = PENDING, requeued_at(task, now)
        task.attempt = max(0, task.attempt - 1)
    return change


def abandoned(reason: str, now: float):
    """Recovery of a task whose worker stopped heartbeating: retry, or dead letter
    once its attempts are used up (a task that kills its workers must end)."""

    def change(task: Task) -> None:
        task.last_error = {"type": "LeaseExpired", "message": reason, "traceback": "", "attempt": task.attempt}
        task.lease_id = task.lease_deadline = task.worker_id = None
        if task.attempt > task.max_retries or task.cancel_requested:
            task.status, task.finished_at = (FAILED if not task.cancel_requested else "cancelled"), now
        else:
            task.status, task.available_at = PENDING, requeued_at(task, now)
    return change
