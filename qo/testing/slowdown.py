"""S3's request-rate throttle for a test or benchmark server: ``503 SlowDown`` above a
rate per partition prefix.

S3 serves about 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per second per
partitioned prefix and answers ``503 SlowDown`` above that, until it has split the
partition (which takes minutes). ``SlowDown(rate, depth=2)`` is WSGI middleware that
does the same at a small scale: every request counts against its partition, the
bucket plus the object key up to and including its ``depth``-th ``/``
(``bucket/{queue}/{kind}/`` for qo's keys, when the URL has no prefix of its own); a
request that would make more than ``rate`` requests admitted in the last second
(sliding) gets S3's XML error instead of reaching the app::

    from qo.testing.moto import MotoServer
    from qo.testing.slowdown import SlowDown

    throttle = SlowDown(rate=40)
    with MotoServer(middleware=throttle) as server:
        ...
    throttle.stats()  # {"requests": ..., "slowdowns": ..., "partitions": {...}}

A LIST counts against the partition of its ``prefix``, a DeleteObjects against its
first key's. One rate for reads and writes (S3 has two); path-style addressing only
(qo's default with an ``endpoint_url``). Thread-safe: the server is threaded.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote

__all__ = ["SlowDown", "partition_of", "SLOWDOWN_BODY"]

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
_WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
_FIRST_KEY = re.compile(rb"<Key>([^<]*)</Key>")


def partition_of(bucket: str, key: str, depth: int) -> str:
    """``bucket/`` plus ``key`` up to and including its ``depth``-th ``/`` (or its last
    ``/`` when it has fewer): the prefix a request counts against."""
    cut, end = 0, -1
    for _ in range(depth):
        end = key.find("/", cut)
        if end < 0:
            break
        cut = end + 1
    return f"{bucket}/{key[:cut]}"


class _Partition:
    __slots__ = ("admitted", "seen", "requests", "slowdowns", "peak")

    def __init__(self) -> None:
        self.admitted: deque[float] = deque()  # admission times within the window
        self.seen: deque[float] = deque()  # arrival times within the window (admitted or not)
        self.requests = 0
        self.slowdowns = 0
        self.peak = 0  # most requests that arrived within one window


class SlowDown:
    """WSGI middleware: ``503 SlowDown`` above ``rate`` requests per ``window`` seconds
    (sliding) per partition (see :func:`partition_of`). ``rate=None`` only counts."""

    def __init__(self, rate: float | None, *, depth: int = 2, window: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 requests per second (or None: count only)")
        if depth < 0:
            raise ValueError("depth must be >= 0")
        self.rate, self.depth, self.window, self._clock = rate, depth, window, clock
        self._lock = threading.Lock()
        self._parts: dict[str, _Partition] = {}

    # -- the decision -----------------------------------------------------------------

    def partition(self, environ: dict[str, Any]) -> str:
        """The partition a request counts against (path-style: ``/bucket/key``)."""
        path = environ.get("PATH_INFO", "").lstrip("/")
        bucket, _, key = path.partition("/")
        if not key:
            query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
            if "prefix" in query:
                key = query["prefix"][0]
            elif "delete" in query and environ.get("REQUEST_METHOD") == "POST":
                key = self._first_deleted_key(environ)
        return partition_of(bucket, key, self.depth)

    @staticmethod
    def _first_deleted_key(environ: dict[str, Any]) -> str:
        """The first key of a DeleteObjects body; the body is put back for the app."""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        found = _FIRST_KEY.search(body)
        return unquote(found.group(1).decode("utf-8", "replace")) if found else ""

    def admit(self, part: str) -> bool:
        """Count a request against ``part``; False when it must be refused."""
        now = self._clock()
        with self._lock:
            p = self._parts.get(part)
            if p is None:
                p = self._parts[part] = _Partition()
            horizon = now - self.window
            for times in (p.admitted, p.seen):
                while times and times[0] <= horizon:
                    times.popleft()
            p.requests += 1
            p.seen.append(now)
            p.peak = max(p.peak, len(p.seen))
            if self.rate is not None and len(p.admitted) >= self.rate * self.window:
                p.slowdowns += 1
                return False
            p.admitted.append(now)
            return True

    # -- WSGI -------------------------------------------------------------------------

    def __call__(self, app: _WSGIApp) -> _WSGIApp:
        """Wrap ``app`` (so an instance is a ``MotoServer(middleware=...)``)."""

        def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
            if self.admit(self.partition(environ)):
                return app(environ, start_response)
            return self.refuse(environ, start_response)

        return wrapped

    @staticmethod
    def refuse(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        """Answer as S3 does: ``503`` with the ``SlowDown`` XML error (the request's
        body read and dropped, so the connection can carry the next one)."""
        stream = environ.get("wsgi.input")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if stream is not None and length:
            stream.read(length)
        body = b"" if environ.get("REQUEST_METHOD") == "HEAD" else SLOWDOWN_BODY
        start_response("503 Slow Down", [("Content-Type", "application/xml"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    # -- what happened ------------------------------------------------------------------

    @property
    def slowdowns(self) -> int:
        """SlowDown answers sent so far."""
        with self._lock:
            return sum(p.slowdowns for p in self._parts.values())

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """``requests`` and ``slowdowns`` in all, and per partition its requests,
        slowdowns and ``peak`` (most requests arriving within one window)."""
        with self._lock:
            parts = {name: {"requests": p.requests, "slowdowns": p.slowdowns, "peak": p.peak}
                     for name, p in sorted(self._parts.items())}
            if reset:
                for p in self._parts.values():
                    p.requests = p.slowdowns = 0
                    p.peak = len(p.seen)
        total = Counter[str]()
        for p in parts.values():
            total.update(requests=p["requests"], slowdowns=p["slowdowns"])
        return {"requests": total["requests"], "slowdowns": total["slowdowns"], "partitions": parts}
