"""Schedules: cron, timezone, next fire, last fired task; pause, resume, trigger now."""

from __future__ import annotations

import logging

from aiohttp import web

from ..rendering import render
from ..state import state

from qo import InvalidInput, QoError, ScheduleNotFound

from .. import params, security
from .actions import back

log = logging.getLogger("qo_dashboard")

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
            raise back("/schedules", "triggered", schedule=name, task=task.id)
        await getattr(schedules, action)(name)
    except InvalidInput as exc:
        if exc.field != "name":
            raise
        raise params.bad("name", "is not a schedule name") from None  # checked before any request
    except ScheduleNotFound:
        raise back("/schedules", "schedule-missing", schedule=name) from None
    except QoError as exc:
        log.warning("%s of schedule %s failed: %s", action, name, exc)
        raise back("/schedules", "schedule-failed", action=action, schedule=name) from None
    raise back("/schedules", "paused" if action == "pause" else "resumed", schedule=name)
