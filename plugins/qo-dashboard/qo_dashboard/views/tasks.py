"""Tasks: the filtered, paginated listing; one task; the dead letters."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from ..rendering import render
from ..state import state

import qo

from .. import flash, params

RETRYABLE = ("failed", "cancelled", "expired")
CANCELLABLE = ("pending", "blocked", "running")


async def _listing(request: web.Request, *, status: str | None, task_type: str | None,
                   since: float | None) -> dict[str, Any]:
    limit = params.limit(request)
    after = params.cursor(request)
    queue = state(request)["queue"]
    try:
        result = await queue.page(status, task_type, None if since is None else queue.clock.now() - since,
                                  after=after, limit=limit)
    except qo.InvalidInput as exc:
        if exc.field != "after":
            raise
        raise params.bad("after", "is not a cursor of this listing") from None
    query = {k: v for k, v in request.query.items() if k != "after" and not flash.is_flash_param(k)}
    more = None
    if result.next_cursor is not None:
        more = request.path + "?" + urlencode({**query, "after": result.next_cursor})
    first = request.path + ("?" + urlencode(query) if query else "") if after else None
    return {"tasks": result.tasks, "more": more, "first": first, "capped": result.capped,
            "limit": limit, "cost": {"lists": result.lists, "reads": result.reads}}


async def listing(request: web.Request) -> web.Response:

    status = params.status(request)
    task_type = params.task_type(request)
    since_text = params.one(request, "since")
    since = params.since(request)
    found = await _listing(request, status=status, task_type=task_type, since=since)
    return render(request, "tasks.html", active="tasks", statuses=qo.STATUSES, status=status or "",
                  task_type=task_type or "", since=since_text or "", retryable=RETRYABLE,
                  cancellable=CANCELLABLE, **found)


async def dead_letters(request: web.Request) -> web.Response:

    task_type = params.task_type(request)
    since_text = params.one(request, "since")
    since = params.since(request)
    found = await _listing(request, status="failed", task_type=task_type, since=since)
    return render(request, "dead_letters.html", active="dead", task_type=task_type or "",
                  since=since_text or "", **found)


async def detail(request: web.Request) -> web.Response:

    queue = state(request)["queue"]
    task_id = params.task_id(request.match_info["id"])
    try:
        task = await queue.get(task_id)
    except qo.TaskNotFound:
        return render(request, "not_found.html", http_status=404, active="tasks", what=f"task {task_id}")
    except qo.CorruptObject as exc:
        return render(request, "not_found.html", http_status=500, active="tasks", what=f"task {task_id}: {exc}")
    dependents: list[tuple[str, str]] = []
    if task.has_dependents:  # one LIST, only when the task says it has dependents
        dependents = await queue.dependents(task.id)
    origin = None
    for schedule in await queue.schedules.list():  # one LIST + one GET per schedule
        if schedule.last_task_id == task.id:
            origin = schedule.name
    try:
        effective = queue.effective_priority(task)
    except Exception:  # a plugin's bad answer must not hide the task
        effective = None
    return render(request, "task.html", active="tasks", task=task, dependents=dependents, origin=origin,
                  effective=effective, retryable=RETRYABLE, cancellable=CANCELLABLE)
