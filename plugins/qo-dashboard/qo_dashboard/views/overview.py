"""The overview (counts, ready depth, oldest due, throughput chart, workers) and login."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..rendering import counted, render
from ..state import state

from .. import history, security

BAND_ORDER = ("critical", "high", "normal", "low", "background")


async def data(request: web.Request) -> dict[str, Any]:
    """Everything the overview shows: ``queue.stats()`` and one LIST of ``ended/failed/``."""

    app = state(request)
    queue = app["queue"]
    before = counted(request)
    stats = await queue.stats()
    app["throughput"].observe(stats)
    failed, failed_all = await history.failures(queue, stats["at"])
    cost = counted(request) - before
    if app["counter"] is not None:
        app["refresh_cost"] = cost
    workers = stats["workers"]
    live = [w for w in workers if w["alive"]]
    return {
        "stats": stats,
        "bands": [(b, stats["ready_by_band"].get(b, 0)) for b in BAND_ORDER],
        "band_peak": max([1, *stats["ready_by_band"].values()]),
        "chart": history.chart(app["throughput"].completed, failed, stats["at"]),
        "failed_all": failed_all,
        "since": app["throughput"].first_at,
        "workers": sorted(workers, key=lambda w: (not w["alive"], w["worker_id"])),
        "live": live,
        "refresh_cost": app["refresh_cost"],
        "per_minute": None if app["refresh_cost"] is None else app["refresh_cost"] * 60.0 / app["refresh"],
    }


async def page(request: web.Request) -> web.Response:

    return render(request, "overview.html", active="overview", **await data(request))


async def fragment(request: web.Request) -> web.Response:

    return render(request, "_overview.html", active="overview", **await data(request))


async def login_form(request: web.Request) -> web.Response:

    if state(request)["guard"].auth_token is None:
        raise web.HTTPSeeOther("/")
    return render(request, "login.html", active="", next=security.local_path(request.query.get("next")),
                  error=None)


async def login(request: web.Request) -> web.Response:

    guard = state(request)["guard"]
    if guard.auth_token is None:
        raise web.HTTPSeeOther("/")
    guard.logins.check(request.remote)  # 429 while this address waits, even for the right token
    form = await request.post()
    token, target = form.get("token"), security.local_path(form.get("next"))
    if not isinstance(token, str) or not guard.check_token(token):
        guard.logins.failed(request.remote)
        return render(request, "login.html", http_status=401, active="", next=target, error="That token is not right.")
    response = web.HTTPSeeOther(target)
    response.set_cookie(security.COOKIE, guard.cookie_value(), httponly=True, samesite="Strict",
                        secure=request.secure, path="/")
    raise response
