"""Schedules: cron, timezone, next fire, last fired task; pause, resume, trigger now."""

from __future__ import annotations

from aiohttp import web

from ..rendering import render
from ..state import state
from yarl import URL

from qo import InvalidInput, QoError

from .. import params, security

ACTIONS = ("pause", "resume", "trigger")


async def page(request: web.Request) -> web.Response:

    schedules = await state(request)["queue"].schedules.list()  # one LIST + one GET each
    return render(request, "schedules.html", active="schedules", schedules=schedules)


async def act(request: web.Request) -> web.Response:
    form = await security.check_action(request)
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in ACTIONS:
        raise params.bad("action", f"is not one of {', '.join(ACTIONS)}")
    schedules = state(request)["queue"].schedules
    try:
        if action == "trigger":
            task = await schedules.trigger(name)
            msg = f"triggered {name}: task {task.id}"
        else:
            await getattr(schedules, action)(name)
            msg = f"{'paused' if action == 'pause' else 'resumed'} {name}"
    except InvalidInput as exc:
        if exc.field != "name":
            raise
        raise params.bad("name", "is not a schedule name") from None  # checked before any request
    except QoError as exc:
        msg = f"{action} {name}: {exc}"
    raise web.HTTPSeeOther(str(URL("/schedules").update_query(msg=msg)))
