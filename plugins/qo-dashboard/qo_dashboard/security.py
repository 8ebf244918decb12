"""Safety: security headers, the optional bearer token or login cookie, CSRF tokens.

- Every response carries a Content-Security-Policy without inline scripts or styles,
  ``X-Frame-Options: DENY`` and ``X-Content-Type-Options: nosniff``.
- With an auth token, every page needs ``Authorization: Bearer TOKEN`` or the cookie
  the login form sets (HttpOnly, SameSite=Strict; its value is an HMAC of the token
  under the process's secret, never the token itself). Static files need nothing.
- Every POST (an action) carries a CSRF token, in the form field ``csrf`` or the
  ``X-CSRF-Token`` header: an HMAC under a per-process secret, compared with
  ``hmac.compare_digest``. Actions are refused (403) unless started with
  ``--allow-actions``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Any, Awaitable, Callable

from aiohttp import web

from .state import state

COOKIE = "qo_dashboard_auth"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
#: paths served without auth: the login form and the static files it needs
OPEN_PATHS = ("/login", "/static/")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """The process's secret and what is derived from it."""

    def __init__(self, auth_token: str | None = None, secret: bytes | None = None):
        self.auth_token = auth_token or None
        self.secret = secret or secrets.token_bytes(32)

    def _mac(self, what: bytes) -> str:
        return hmac.new(self.secret, what, hashlib.sha256).hexdigest()

    @property
    def csrf_token(self) -> str:
        return self._mac(b"csrf")

    def check_csrf(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf_token.encode())

    def cookie_value(self) -> str:
        assert self.auth_token is not None
        return self._mac(b"auth:" + self.auth_token.encode())

    def check_token(self, given: str) -> bool:
        return self.auth_token is not None and hmac.compare_digest(given.encode(), self.auth_token.encode())

    def authenticated(self, request: web.Request) -> bool:
        if self.auth_token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value and self.check_token(value.strip()):
            return True
        cookie = request.cookies.get(COOKIE)
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.cookie_value().encode())


def headers_middleware() -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
            _add_headers(request, response)
            raise
        _add_headers(request, response)
        return response

    return middleware


def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


def auth_middleware(guard: Guard) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if guard.auth_token is None or request.path.startswith(OPEN_PATHS) or guard.authenticated(request):
            return await handler(request)
        if request.method == "GET" and "HX-Request" not in request.headers \
                and "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPSeeOther(f"/login?next={_safe_next(request.path_qs)}")
        raise web.HTTPUnauthorized(text="401: this dashboard needs Authorization: Bearer TOKEN or a login\n",
                                   headers={"WWW-Authenticate": 'Bearer realm="qo dashboard"'})

    return middleware


def _safe_next(path: str) -> str:
    """A local path to go back to after login (never another site)."""
    from urllib.parse import quote

    if not path.startswith("/") or path.startswith("//"):
        path = "/"
    return quote(path, safe="")


def local_path(value: str | None, default: str = "/") -> str:
    """``value`` if it is a path on this site, else ``default`` (no open redirects)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    return value


async def check_action(request: web.Request) -> Any:
    """The POSTed form of an action, after the checks: actions allowed (403), CSRF (403)."""
    app = state(request)
    if not app["allow_actions"]:
        raise web.HTTPForbidden(text="403: read-only dashboard (start it with --allow-actions to act)\n")
    form = await request.post()
    given = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not isinstance(given, str) or not app["guard"].check_csrf(given):
        raise web.HTTPForbidden(text="403: missing or wrong CSRF token\n")
    return form
