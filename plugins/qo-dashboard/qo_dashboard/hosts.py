"""Which ``Host:`` names this server answers to, and which origins may POST to it.

DNS rebinding: a page on any website can point its own name at 127.0.0.1 and then talk
to the dashboard as "same origin". The browser still sends that name in ``Host:``, so a
request for a name the server was not started for is answered 421, and a POST whose
``Origin`` (or, without one, ``Sec-Fetch-Site``) is another site is answered 403 before
anything changes.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable
from urllib.parse import urlsplit

from aiohttp import web

from .security import Handler, is_loopback

#: the names of this machine when the server is bound to loopback
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: binds that listen on every address: any IP literal names this machine (a literal
#: cannot be rebound: rebinding needs a DNS name), and so does localhost
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
#: a DNS name (letters, digits, hyphens, dots; no trailing dot)
NAME = re.compile(r"^(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_\-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_\-]{0,62}))*\Z")
HOST_HEADER = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.\-]+))(?::(?P<port>[0-9]{1,5}))?\Z")
DEFAULT_PORTS = {"http": 80, "https": 443}
#: ``Sec-Fetch-Site`` values of a request this server's own pages (or the address bar) made
SAME_SITE_FETCH = frozenset({"same-origin", "none"})


class BadHostName(ValueError):
    """A name given with ``--allowed-host`` that is not a host name or IP address."""


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def normalise(name: str) -> str:
    """``name`` as the Host check compares it: lower case, an IPv6 address without brackets
    and in its short form. Raises BadHostName for anything that is not a name or address."""
    text = name.strip().lower()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    ip = _ip(bare)
    if ip is not None:
        return str(ip)
    if bare != text or not NAME.match(text):
        raise BadHostName(f"{name[:80]!r} is not a host name or IP address (no scheme, port or path)")
    return text


class HostRule:
    """The host names one server answers to (see the module docstring)."""

    def __init__(self, bind: str = "127.0.0.1", extra: Iterable[str] = ()):
        names = {normalise(n) for n in extra}
        self.any_ip = bind.strip("[]") in WILDCARD_BINDS
        if not self.any_ip:
            names.add(normalise(bind))
        if self.any_ip or is_loopback(bind):
            names |= LOOPBACK_NAMES
        self.names = frozenset(names)

    def accepts(self, host_header: str | None) -> bool:
        """Whether a request with this ``Host:`` value (port or not) is for this server."""
        parsed = split_host(host_header)
        if parsed is None:
            return False
        name, _ = parsed
        return name in self.names or (self.any_ip and _ip(name) is not None)


def split_host(value: str | None) -> tuple[str, int | None] | None:
    """(name, port) of a ``Host:`` value, name normalised; None when malformed."""
    match = HOST_HEADER.match((value or "").strip().lower())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and port > 65535:
        return None
    if match["v6"]:
        ip = _ip(match["v6"])
        return (str(ip), port) if isinstance(ip, ipaddress.IPv6Address) else None
    ip = _ip(match["name"])
    return (str(ip) if ip is not None else match["name"], port)


def same_origin(origin: str | None, fetch_site: str | None, host_header: str | None) -> bool:
    """Whether a POST came from this server's own pages: its ``Origin`` names the host and
    port of ``Host:``; without an Origin (or with ``null``, which a browser may send for
    its own form), ``Sec-Fetch-Site`` is same-origin (or none, the address bar); with
    neither (curl, scripts) it is not a browser's cross-site request."""
    if origin is not None and origin.strip() != "null":
        return _origin_is(origin, host_header)
    if fetch_site is None:
        return origin is None  # "null" (a sandboxed or data: page) with no fetch metadata: refused
    return fetch_site.strip().lower() in SAME_SITE_FETCH


def _origin_is(origin: str, host_header: str | None) -> bool:
    host = split_host(host_header)
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if host is None or parts.scheme not in DEFAULT_PORTS or parts.path not in ("", "/") or parts.query \
            or parts.fragment:
        return False
    given = split_host(parts.netloc)  # None for "null", userinfo, a bad port
    if given is None:
        return False
    default = DEFAULT_PORTS[parts.scheme]
    return given[0] == host[0] and (given[1] or default) == (host[1] or default)


MISDIRECTED = ("421: this dashboard does not answer to that host name (open it by the address it was "
               "started on, or start it with --allowed-host NAME)\n")
CROSS_SITE = "403: a POST from another site is refused\n"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_middleware(rule: HostRule) -> Any:
    """Every request: a ``Host:`` this server answers to (421); every POST: from its own pages (403)."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not rule.accepts(host):
            raise web.HTTPMisdirectedRequest(text=MISDIRECTED)
        if request.method not in SAFE_METHODS and not same_origin(
                request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site"), host):
            raise web.HTTPForbidden(text=CROSS_SITE)
        return await handler(request)

    return middleware
