"""Bulk actions: retry or cancel every task of a status (and type, and age) at once.

A bulk action is the listing of that status (``queue.list``, from the index that
projects it: docs/architecture.md §5g) followed by the ordinary one-task action
(``queue.retry`` or ``queue.cancel``) on each listed task, ``CONCURRENCY`` at a time.
Nothing new is written and no new way to change a task exists: each task changes by
the same compare-and-swap as one ``qo retry ID``, so a bulk action racing a worker, a
person or another bulk action is exactly as safe as those single actions are. A task
that changed state between the listing and its action (``TaskStateError``: retried,
ran, finished meanwhile) or vanished (``TaskNotFound``) is skipped and not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any, AsyncIterator, Awaitable, Callable

from . import keys
from .errors import InvalidInput, TaskNotFound, TaskStateError
from .model import BLOCKED, CANCELLED, EXPIRED, FAILED, PENDING, RUNNING, Task, _short, check_task_type

#: statuses ``retry_many`` takes: the ends a person may undo (queue.retry)
RETRYABLE = (FAILED, CANCELLED, EXPIRED)
#: statuses ``cancel_many`` takes; ``running``: ask those tasks to stop (cancel_requested)
CANCELLABLE = (PENDING, BLOCKED, RUNNING, FAILED)
#: actions in flight at once: each is 2-4 requests, so this bounds a bulk action's
#: request rate without making a large one slow
CONCURRENCY = 16

Progress = Callable[[int, int], Any]


def check(queue: Any, status: Any, allowed: tuple[str, ...], task_type: Any, since: Any,
          progress: Any) -> float | None:
    """Validate a bulk action's arguments, before anything is read or written; returns
    ``since`` as epoch seconds. Each bad argument is an ``InvalidInput`` naming it."""
    if not isinstance(status, str) or status not in allowed:
        raise InvalidInput("status", f"{_short(status)} is not one of {', '.join(allowed)}")
    if task_type is not None:
        check_task_type(task_type)
    if progress is not None and not callable(progress):
        raise InvalidInput("progress", "must be None or a callable progress(done, total_so_far)")
    when = queue._since(since)
    # to the millisecond, the resolution of every index and task id: a task made in the
    # same millisecond as ``since`` is made "at or after" it, whatever the index
    return None if when is None else math.floor(when * 1000) / 1000


async def apply(tasks: AsyncIterator[Task], action: Callable[[Task], Awaitable[bool]],
                progress: Progress | None) -> int:
    """Run ``action`` on each task as it is listed, ``CONCURRENCY`` at a time; returns
    how many it changed (``action`` returned True). After each change, ``progress(done,
    listed)``: changes so far, tasks listed so far. A task that changed state meanwhile
    or vanished is skipped. Any other error stops the listing, lets the actions in
    flight finish (none is left half done by us) and is raised."""
    slots = asyncio.Semaphore(CONCURRENCY)
    running: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []
    listed = done = 0
    #: tasks of one pack change one after another: each is a CAS of the same object
    packs: dict[str, asyncio.Lock] = {}

    def turn(task: Task) -> Any:
        pack = keys.pack_of(task.id)
        return contextlib.nullcontext() if pack is None else packs.setdefault(pack[0], asyncio.Lock())

    async def one(task: Task) -> None:
        nonlocal done
        try:
            async with turn(task):
                changed = await action(task)
            if not changed:
                return
        except (TaskStateError, TaskNotFound):
            return  # changed state (or vanished) since it was listed: not ours to change
        except Exception as exc:  # noqa: BLE001 - raised below, once the others settled
            errors.append(exc)
            return
        finally:
            slots.release()
        done += 1
        if progress is not None:
            progress(done, listed)

    try:
        async for task in tasks:
            await slots.acquire()
            if errors:
                slots.release()
                break
            listed += 1
            job = asyncio.ensure_future(one(task))
            running.add(job)
            job.add_done_callback(running.discard)
    finally:
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    if errors:
        raise errors[0]
    return done


async def retry_many(queue: Any, status: Any, task_type: Any, since: Any, progress: Any) -> int:
    """``Queue.retry_many``: every ``status`` task (of ``task_type``, ended since ``since``)
    back to pending. Newest first: the ``ended/`` index is then read page by page as the
    retries go, and an entry a retried task writes when it ends again sorts before the
    listing's cursor, so it is not met again."""
    when = check(queue, status, RETRYABLE, task_type, since, progress)

    async def action(task: Task) -> bool:
        await queue.retry(task.id)
        return True

    return await apply(queue.list(status=status, task_type=task_type, limit=None, newest_first=True,
                                  since=when), action, progress)


async def cancel_many(queue: Any, status: Any, task_type: Any, since: Any, progress: Any) -> int:
    """``Queue.cancel_many``: cancel every ``status`` task (of ``task_type``, created since
    ``since``); ``running``: request their cancel; ``failed``: give the dead letters up
    (they end ``cancelled``). Oldest first (the next to be claimed)."""
    when = check(queue, status, CANCELLABLE, task_type, since, progress)

    async def action(task: Task) -> bool:
        if task.status == RUNNING and task.cancel_requested:
            return False  # asked already: nothing to change
        try:
            await queue.cancel(task.id)
        except TaskStateError:  # ended meanwhile (a running one completed): not ours to count
            return False
        return True

    return await apply(queue.list(status=status, task_type=task_type, limit=None, since=when), action, progress)
