"""Tasks: the filtered, paginated listing; one task; the dead letters."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from ..state import state

from qo import keys
from qo.aging import task_effective_priority
from qo.errors import CorruptObject, TaskNotFound
from qo.model import STATUSES

from .. import params
from ..tasklist import CursorError, page as task_page

RETRYABLE = ("failed", "cancelled", "expired")
CANCELLABLE = ("pending", "blocked", "running")


async def _listing(request: web.Request, *, status: str | None, task_type: str | None,
                   since: float | None) -> dict[str, Any]:
    limit = params.limit(request)
    after = params.cursor(request)
    try:
        result = await task_page(state(request)["queue"], status, task_type, since, after, limit)
    except CursorError:
        raise params.bad("after", "is not a cursor of this listing") from None
    query = {k: v for k, v in request.query.items() if k not in ("after", "msg")}
    more = None
    if result.next_cursor is not None:
        more = request.path + "?" + urlencode({**query, "after": result.next_cursor})
    first = request.path + ("?" + urlencode(query) if query else "") if after else None
    return {"tasks": result.tasks, "more": more, "first": first, "capped": result.capped,
            "limit": limit, "cost": {"lists": result.lists, "reads": result.reads}}


async def listing(request: web.Request) -> web.Response:
    from ..app import render

    status = params.status(request)
    task_type = params.task_type(request)
    since_text = params.one(request, "since")
    since = params.since(request)
    found = await _listing(request, status=status, task_type=task_type, since=since)
    return render(request, "tasks.html", active="tasks", statuses=STATUSES, status=status or "",
                  task_type=task_type or "", since=since_text or "", retryable=RETRYABLE,
                  cancellable=CANCELLABLE, **found)


async def dead_letters(request: web.Request) -> web.Response:
    from ..app import render

    task_type = params.task_type(request)
    since_text = params.one(request, "since")
    since = params.since(request)
    found = await _listing(request, status="failed", task_type=task_type, since=since)
    return render(request, "dead_letters.html", active="dead", task_type=task_type or "",
                  since=since_text or "", **found)


async def detail(request: web.Request) -> web.Response:
    from ..app import render

    queue = state(request)["queue"]
    task_id = params.task_id(request.match_info["id"])
    try:
        task = await queue.get(task_id)
    except TaskNotFound:
        return render(request, "not_found.html", http_status=404, active="tasks", what=f"task {task_id}")
    except CorruptObject as exc:
        return render(request, "not_found.html", http_status=500, active="tasks", what=f"task {task_id}: {exc}")
    now = queue.clock.now()
    dependents: list[tuple[str, str]] = []
    if task.has_dependents:  # one LIST, only when the task says it has dependents
        for entry in await queue.store.list(keys.deps_prefix(queue.name, task.id), limit=1000):
            edge = keys.parse_dep(entry.key)
            if edge is not None:
                dependents.append((edge[1], edge[2]))
    origin = None
    for schedule in await queue.schedules.list():  # one LIST + one GET per schedule
        if schedule.last_task_id == task.id:
            origin = schedule.name
    try:
        effective = task_effective_priority(queue.plugins, task, now)
    except Exception:  # a plugin's bad answer must not hide the task
        effective = None
    return render(request, "task.html", active="tasks", task=task, dependents=dependents, origin=origin,
                  effective=effective, retryable=RETRYABLE, cancellable=CANCELLABLE)
