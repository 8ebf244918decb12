"""The aiohttp application: ``create_app(queue, ...)`` wires the pages, the safety
middlewares, the templates (Jinja2, autoescaped) and the static files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import jinja2
from aiohttp import web

from qo import redact_url
from qo.counting import CountingStorage

from . import fmt, hosts, security
from .costs import DEFAULT_PRICES, RequestMeter
from .history import Throughput
from .logins import LoginLimiter
from .state import STATE
from .views import actions, costs, limits, overview, schedules, tasks

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"


def templates() -> jinja2.Environment:
    """Templates with autoescaping on for every file: a task's input, output and error are
    written by whoever submits or runs tasks, so nothing is rendered unescaped unless a
    template says so (none does)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt.FILTERS)
    return env


def create_app(queue: Any, *, allow_actions: bool = False, auth_token: str | None = None,
               refresh: float = 5.0, prices: Mapping[str, float] | None = None,
               secret: bytes | None = None, bind: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
               logins: LoginLimiter | None = None) -> web.Application:
    """The dashboard of ``queue``. Its requests are counted (the cost meter) when the queue
    was opened with ``wrap_storage=qo.counting.CountingStorage``. It answers to the host
    names of ``bind`` (the address served on) and ``allowed_hosts`` only (hosts.py);
    ``logins`` limits wrong tokens (default: logins.LoginLimiter())."""
    guard = security.Guard(auth_token, secret, logins)
    app = web.Application(middlewares=[
        security.headers_middleware(), hosts.host_middleware(hosts.HostRule(bind, allowed_hosts)),
        security.browser_middleware(), security.auth_middleware(guard)])
    backend = getattr(queue, "backend", queue.storage)
    counter = backend if isinstance(backend, CountingStorage) else None
    app[STATE] = dict(
        queue=queue, guard=guard, allow_actions=allow_actions, refresh=float(refresh),
        prices=dict(prices or DEFAULT_PRICES), counter=counter, env=templates(),
        meter=RequestMeter(counter.counts) if counter is not None else None,
        throughput=Throughput(), store_label=redact_url(str(queue.url)), started=time.time(),
        refresh_cost=None,
    )
    app.router.add_get("/", overview.page)
    app.router.add_get("/fragments/overview", overview.fragment)
    app.router.add_get("/tasks", tasks.listing)
    app.router.add_get("/tasks/{id}", tasks.detail)
    app.router.add_get("/dead-letters", tasks.dead_letters)
    app.router.add_post("/actions/retry", actions.retry)
    app.router.add_post("/actions/cancel", actions.cancel)
    app.router.add_get("/schedules", schedules.page)
    app.router.add_post("/schedules/{name}/{action}", schedules.act)
    app.router.add_get("/limits", limits.page)
    app.router.add_get("/costs", costs.page)
    app.router.add_get("/login", overview.login_form)
    app.router.add_post("/login", overview.login)
    app.router.add_static("/static/", STATIC, append_version=False)
    return app


