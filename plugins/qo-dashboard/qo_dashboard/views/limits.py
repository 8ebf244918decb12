"""Limits: rate, burst, current tokens, running counts (``queue.limits.list()``)."""

from __future__ import annotations

from aiohttp import web

from ..rendering import render
from ..state import state


async def page(request: web.Request) -> web.Response:

    rows = await state(request)["queue"].limits.list()  # one LIST + the definitions and states
    return render(request, "limits.html", active="limits", limits=rows)
