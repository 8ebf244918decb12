"""Safety: security headers, the optional bearer token or login cookie, CSRF tokens.

- Every response carries a Content-Security-Policy without inline scripts or styles,
  ``X-Frame-Options: DENY`` and ``X-Content-Type-Options: nosniff``.
- With an auth token, every page needs ``Authorization: Bearer TOKEN`` or the cookie
  the login form sets (HttpOnly, SameSite=Strict; its value is an HMAC of the token
  under the process's secret, never the token itself). Static files need nothing.
  Wrong tokens (form or header) are limited per client address (logins.py).
- Every POST (an action) carries a CSRF token, in the form field ``csrf`` or the
  ``X-CSRF-Token`` header: an HMAC, under a per-process secret, of the browser's own
  random cookie (set on its first visit, HttpOnly, SameSite=Strict), compared with
  ``hmac.compare_digest``; one browser's token is worthless with another's cookie.
  Actions are refused (403) unless started with ``--allow-actions``.
- The Host and Origin checks against DNS rebinding are in hosts.py.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import unicodedata
from typing import Any, Awaitable, Callable
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web
from yarl import URL

from .logins import LoginLimiter
from .state import state

COOKIE = "qo_dashboard_auth"
#: the browser's own random cookie, which its CSRF token is derived from
BROWSER_COOKIE = "qo_dashboard_browser"
BROWSER_VALUE = re.compile(r"^[A-Za-z0-9_\-]{43}\Z")  # secrets.token_urlsafe(32)
#: the request's browser cookie, sent or just made (web.RequestKey from aiohttp 3.12; a str before)
BROWSER_KEY: Any = web.RequestKey("qo_dashboard.browser", str) if hasattr(web, "RequestKey") \
    else "qo_dashboard.browser"
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
    "Referrer-Policy": "same-origin",  # no Referer to other sites; a real Origin on our own POSTs
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

    def __init__(self, auth_token: str | None = None, secret: bytes | None = None,
                 logins: LoginLimiter | None = None):
        self.auth_token = auth_token or None
        self.secret = secret or secrets.token_bytes(32)
        self.logins = logins or LoginLimiter()

    def _mac(self, what: bytes) -> str:
        return hmac.new(self.secret, what, hashlib.sha256).hexdigest()

    def csrf_token(self, browser: str) -> str:
        """The CSRF token of the browser whose cookie is ``browser``."""
        return self._mac(b"csrf:" + browser.encode())

    def check_csrf(self, browser: str | None, given: str | None) -> bool:
        """Whether ``given`` is the token of the cookie the request carried (``browser``)."""
        if not browser or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(browser).encode())

    def cookie_value(self) -> str:
        assert self.auth_token is not None
        return self._mac(b"auth:" + self.auth_token.encode())

    def check_token(self, given: str) -> bool:
        return self.auth_token is not None and hmac.compare_digest(given.encode(), self.auth_token.encode())

    def has_login(self, request: web.Request) -> bool:
        """Whether the request carries the login cookie."""
        cookie = request.cookies.get(COOKIE)
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.cookie_value().encode())

    def bearer_ok(self, request: web.Request) -> bool | None:
        """Whether the request's ``Authorization: Bearer`` token is right (None: no such
        header). A wrong one counts against its address; a throttled address gets 429."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        self.logins.check(request.remote)
        if self.check_token(value.strip()):
            return True
        self.logins.failed(request.remote)
        return False

    def authenticated(self, request: web.Request) -> bool:
        return self.auth_token is None or self.has_login(request) or bool(self.bearer_ok(request))


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
    return quote(local_path(path), safe="")


MAX_PATH = 2000
#: percent-decodings a value is checked through; still encoded after that: refused
MAX_DECODES = 3


def local_path(value: object, default: str = "/") -> str:
    """``value`` if it is a path on this server, else ``default``: no open redirect.

    A path is printable ASCII with one leading '/', no scheme, host, backslash, white
    space, control character or dot segment, as given and after each percent-decoding
    (``/%09/evil.example`` would be ``//evil.example`` once a URL parser drops the tab),
    and what the Location header will hold is checked again."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH or not all("!" <= c <= "~" for c in value):
        return default
    text = value
    for _ in range(MAX_DECODES):
        if not _plain_local(text):
            return default
        decoded = unquote(text)
        if decoded == text:
            try:
                location = str(URL(value))
            except ValueError:
                return default
            return value if _plain_local(location) else default
        text = decoded
    return default


def _plain_local(text: str) -> bool:
    if not text.startswith("/") or text.startswith("//") or "\\" in text:
        return False
    if any(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in text):
        return False
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    if parts.scheme or parts.netloc:
        return False
    return not any(segment in (".", "..") for segment in parts.path.split("/"))


def browser_middleware() -> Any:
    """Give each browser its random cookie on its first visit (its CSRF token is derived from it)."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        sent = sent_browser(request)
        request[BROWSER_KEY] = sent or secrets.token_urlsafe(32)
        if sent is not None or request.path.startswith("/static/"):
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _set_browser(request, exc)
            raise
        _set_browser(request, response)
        return response

    return middleware


def _set_browser(request: web.Request, response: web.StreamResponse) -> None:
    response.set_cookie(BROWSER_COOKIE, request[BROWSER_KEY], httponly=True, samesite="Strict",
                        secure=request.secure, path="/")


def sent_browser(request: web.Request) -> str | None:
    """The browser cookie the request carried, if it is one this server could have made."""
    value = request.cookies.get(BROWSER_COOKIE)
    return value if value is not None and BROWSER_VALUE.match(value) else None


def csrf_of(request: web.Request) -> str:
    """The CSRF token a page served to this request's browser carries."""
    return state(request)["guard"].csrf_token(request[BROWSER_KEY])


async def check_action(request: web.Request) -> Any:
    """The POSTed form of an action, after the checks: actions allowed (403), CSRF (403)."""
    app = state(request)
    if not app["allow_actions"]:
        raise web.HTTPForbidden(text="403: read-only dashboard (start it with --allow-actions to act)\n")
    form = await request.post()
    given = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not isinstance(given, str) or not app["guard"].check_csrf(sent_browser(request), given):
        raise web.HTTPForbidden(text="403: missing or wrong CSRF token\n")
    return form
