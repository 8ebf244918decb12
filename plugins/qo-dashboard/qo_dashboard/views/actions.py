"""Actions (POST, ``--allow-actions`` and a CSRF token required): retry and cancel one
task, many selected, or all of a status at once (``queue.retry_many``/``cancel_many``).
Each answers with a redirect back to the page it came from, saying what it did."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..state import state
from yarl import URL

from qo import InvalidInput, QoError, TaskNotFound, TaskStateError, check_task_id, check_task_type

from .. import params, security

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


def _back(form: Any, msg: str) -> web.HTTPSeeOther:
    target = URL(security.local_path(str(form.get("back") or "/")))
    return web.HTTPSeeOther(str(target.update_query(msg=msg)))


async def _each(ids: list[str], action: Callable[[str], Awaitable[Any]]) -> tuple[int, int, list[str]]:
    """(changed, skipped, errors) after ``action`` on each id, ``CONCURRENCY`` at a time."""
    slots = asyncio.Semaphore(CONCURRENCY)
    done = skipped = 0
    errors: list[str] = []

    async def one(task_id: str) -> None:
        nonlocal done, skipped
        async with slots:
            try:
                await action(task_id)
                done += 1
            except (TaskStateError, TaskNotFound):
                skipped += 1
            except QoError as exc:
                errors.append(f"{task_id}: {exc}")

    await asyncio.gather(*(one(i) for i in ids))
    return done, skipped, errors


def _say(verb: str, done: int, skipped: int, errors: list[str]) -> str:
    msg = f"{verb} {done} task{'s' if done != 1 else ''}"
    if skipped:
        msg += f"; {skipped} skipped (not in a state to be {verb}, or changed meanwhile)"
    if errors:
        msg += f"; {len(errors)} failed: {errors[0]}"
    return msg


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
        raise _back(form, f"{verb} {n} {every} task{'s' if n != 1 else ''}")
    ids = _ids(form)
    if not ids:
        raise _back(form, "nothing selected")
    raise _back(form, _say(verb, *await _each(ids, getattr(queue, one))))
