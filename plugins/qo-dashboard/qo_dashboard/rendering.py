"""What every page shares: the template rendering with the common context, and the
request count of the store. A module of its own so the views need not import the app
(which imports them)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import flash, security
from .state import state

#: the vendored htmx (static/)
HTMX = "htmx-2.0.4.min.js"


def render(request: web.Request, template: str, *, http_status: int = 200, **context: Any) -> web.Response:
    """``template`` with the context every page shares (nav, queue, store, csrf)."""
    app = state(request)
    if app["meter"] is not None:
        app["meter"].sample()
    body = app["env"].get_template(template).render(
        queue_name=app["queue"].name, store=app["store_label"], allow_actions=app["allow_actions"],
        csrf=security.csrf_of(request), csrf_field=security.CSRF_FIELD, path=request.path,
        path_qs=_without_flash(request), htmx=HTMX, refresh=app["refresh"], now=app["queue"].clock.now(),
        msg=flash.text(request.query), auth=app["guard"].auth_token is not None,
        **context)
    return web.Response(text=body, content_type="text/html", status=http_status)


def _without_flash(request: web.Request) -> str:
    """The page's path and query without a flash message's parameters (the forms' back=)."""
    url = request.rel_url
    return str(url.with_query([(k, v) for k, v in url.query.items() if not flash.is_flash_param(k)]))


def counted(request: web.Request) -> int:
    """Requests to the store made so far by this dashboard (0 when not counted)."""
    counter = state(request)["counter"]
    return counter.total if counter is not None else 0
