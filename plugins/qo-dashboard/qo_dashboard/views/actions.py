"""Actions (POST, ``--allow-actions`` and a CSRF token required): retry and cancel one
task, many selected, or all of a status at once (``queue.retry_many``/``cancel_many``).
Each answers with a redirect back to the page it came from (a path on this server only),
saying what it did with a message of flash.py's table."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..state import state
from yarl import URL

from qo import InvalidInput, QoError, TaskNotFound, TaskStateError, check_task_id, check_task_type

from .. import flash, params, security

log = logging.getLogger("qo_dashboard")

#: actions in flight at once
CONCURRENCY = 16
MAX_SELECTED = 500


def _ids(form: Any) -> list[str]:
    ids = form.getall("id", [])
    if len(ids) > MAX_SELECTED:
        raise params.bad("id", f"at most {MAX_SELECTED} tasks at once")
    for value in ids:
        try:
            check_task_id(value, "id")
        except InvalidInput:
            raise params.bad("id", f"{str(value)[:40]!r} is not a task id") from None
    return list(dict.fromkeys(ids))


def back(value: Any, message: str, **values: Any) -> web.HTTPSeeOther:
    """A redirect to ``value`` if it is a path on this server (else to /), its query without
    an earlier message's parameters, saying ``message`` (an id of flash.MESSAGES)."""
    target = URL(security.local_path(value))
    kept = [(k, v) for k, v in target.query.items() if not flash.is_flash_param(k)]
    return web.HTTPSeeOther(str(target.with_query(kept + list(flash.query(message, **values).items()))))


async def _each(verb: str, ids: list[str], action: Callable[[str], Awaitable[Any]]) -> tuple[int, int, int]:
    """(changed, skipped, failed) after ``action`` on each id, ``CONCURRENCY`` at a time;
    each failure is logged (the page's message only counts them)."""
    slots = asyncio.Semaphore(CONCURRENCY)
    done = skipped = failed = 0

    async def one(task_id: str) -> None:
        nonlocal done, skipped, failed
        async with slots:
            try:
                await action(task_id)
                done += 1
            except (TaskStateError, TaskNotFound):
                skipped += 1
            except QoError as exc:
                failed += 1
                log.warning("%s of task %s failed: %s", verb, task_id, exc)

    await asyncio.gather(*(one(i) for i in ids))
    return done, skipped, failed


def _all_filter(form: Any) -> str | None:
    task_type = form.get("type") or None
    if task_type is not None:
        try:
            check_task_type(task_type, "type")
        except InvalidInput:
            raise params.bad("type", "is not a task type") from None
    return task_type


async def retry(request: web.Request) -> web.Response:
    return await _act(request, "retried", ("failed", "cancelled", "expired"), "retry_many", "retry")


async def cancel(request: web.Request) -> web.Response:
    return await _act(request, "cancelled", ("pending", "blocked"), "cancel_many", "cancel")


async def _act(request: web.Request, verb: str, statuses: tuple[str, ...], many: str, one: str) -> web.Response:
    """A POSTed action on the selected ids, or on every task of a status (``all``)."""
    form = await security.check_action(request)
    queue = state(request)["queue"]
    every = form.get("all")
    if every:
        if every not in statuses:
            raise params.bad("all", f"is not {', '.join(statuses[:-1])} or {statuses[-1]}")
        n = await getattr(queue, many)(every, _all_filter(form))
        raise back(form.get("back"), f"{verb}-all", n=n, status=every)
    ids = _ids(form)
    if not ids:
        raise back(form.get("back"), "nothing-selected")
    done, skipped, failed = await _each(one, ids, getattr(queue, one))
    raise back(form.get("back"), verb, done=done, skipped=skipped or None, failed=failed or None)
