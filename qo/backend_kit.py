"""Helpers for writing a storage backend over an HTTP service (used by qo_s3 and
plugins/qo-azure; part of the public plugin API):

- :class:`ServerClock`: the server clock's offset from the local one, from ``Date``
  headers, so leases and due times of every machine agree with the store's clock;
- :class:`SecretScrubber`: a logging filter that replaces known credentials with
  ``***`` in the records of an SDK's loggers, and :func:`scrub` for error texts;
- :func:`split_bucket_url`: ``scheme://bucket/prefix?query`` checked the same way for
  every such backend;
- :class:`Pacer`: spacing the requests to a prefix the store has throttled, so that a
  process sends about what the store accepts instead of a burst of refusals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from email.utils import parsedate_to_datetime
from typing import Awaitable, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import InvalidInput
from .storage import validate_key

__all__ = ["ServerClock", "SecretScrubber", "scrub", "split_bucket_url", "Pacer", "MAX_DRIFT", "MAX_ROUND_TRIP"]

#: clocks drift apart by at most ~100 ppm: the offset bounds widen by that over time
MAX_DRIFT = 1e-4
#: a response that took longer by the local clock (or went back in it) says nothing of
#: the offset: the local clock was set while it was under way
MAX_ROUND_TRIP = 30.0


class ServerClock:
    """Server-minus-local clock offset in seconds (``offset``), refined per response.

    The ``Date`` header has 1-second resolution, so one response sent at ``t0`` and
    received at ``t1`` with ``Date: D`` bounds the offset to ``D - t1 <= offset < D + 1
    - t0``. The estimate keeps the intersection of these intervals (widened by
    ``MAX_DRIFT`` of the elapsed time) and reports its midpoint; an interval that
    contradicts it (the server clock jumped, or another front end answered) restarts it.
    A response during which the local clock was set (``t1`` before ``t0``, or more than
    ``MAX_ROUND_TRIP`` after it) is ignored: its interval would be empty or useless.
    Within ``latency/2 + 0.5 s`` after one response it tightens to about the round-trip
    time, and one slow response cannot pull it off.
    """

    def __init__(self) -> None:
        self.offset: float = 0.0
        self.bounds: tuple[float, float, float] | None = None  # (low, high, local time)

    def observe(self, date_header: str | None, t0: float, t1: float) -> None:
        """Tighten the estimate with a response's ``Date`` header (ignored if absent or bad)."""
        if not date_header or not 0.0 <= t1 - t0 <= MAX_ROUND_TRIP:
            return
        try:
            server = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        low, high = server - t1, server + 1.0 - t0
        if self.bounds is not None:
            old_low, old_high, at = self.bounds
            slack = MAX_DRIFT * max(0.0, t1 - at)
            low, high = max(low, old_low - slack), min(high, old_high + slack)
            if low > high:  # contradiction: the server clock moved; start over
                low, high = server - t1, server + 1.0 - t0
        self.bounds = (low, high, t1)
        self.offset = (low + high) / 2


def scrub(text: str, secrets: Iterable[str], limit: int | None = 300) -> str:
    """``text`` with every secret (of at least 4 characters) replaced by ``***``, cut to
    ``limit`` characters."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text[:limit]


class SecretScrubber(logging.Filter):
    """Replaces every remembered credential with ``***`` in the log records of the
    loggers it is installed on (SDKs log whole requests at DEBUG: headers, signatures,
    tokens). One per backend module: ``SCRUBBER = SecretScrubber().install([...])``."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def install(self, logger_names: Iterable[str]) -> "SecretScrubber":
        for name in logger_names:
            logging.getLogger(name).addFilter(self)
        return self

    def remember(self, secrets: Iterable[str]) -> None:
        """Scrub these from now on (strings shorter than 4 characters are ignored)."""
        self.secrets.update(s for s in secrets if s and len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record is not ours to fix
                return True
            if any(s in message for s in self.secrets):
                record.msg, record.args = scrub(message, self.secrets, limit=None), ()
        return True


def split_bucket_url(url: str, scheme: str, *, query: Mapping[str, str],
                     credentials_hint: str) -> tuple[str, str, dict[str, str]]:
    """``scheme://bucket/prefix?query`` -> (bucket, prefix, settings), refusing what no
    such URL may hold: another scheme, credentials (``user@``; ``credentials_hint`` says
    where they go instead), a #fragment, a prefix that is not a valid key, a query name
    not in ``query`` (which maps each accepted spelling to its setting). The bucket
    name's own rules are the backend's to check."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidInput("url", f"malformed {scheme}:// URL") from None
    if parts.scheme.lower() != scheme:
        raise InvalidInput("url", f"not an {scheme}:// URL")
    if "@" in parts.netloc:
        raise InvalidInput("url", f"credentials do not belong in the URL: {credentials_hint}")
    if parts.fragment:
        raise InvalidInput("url", f"an {scheme}:// URL has no #fragment")
    prefix = unquote(parts.path).strip("/")
    if prefix:
        validate_key(prefix, field="url")
    settings: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidInput("url", "malformed query string") from None
    for name, value in pairs:
        if name not in query:
            raise InvalidInput("url", f"unknown query parameter {name[:40]!r} (known: {', '.join(sorted(query))})")
        settings[query[name]] = value
    return parts.netloc, prefix, settings


class _Lane:
    """The pace of one throttled prefix."""

    __slots__ = ("rate", "next_at", "changed_at")

    def __init__(self, rate: float, now: float):
        self.rate, self.next_at, self.changed_at = rate, now, now


class Pacer:
    """Client-side pacing of the prefixes a store throttles (one per storage object).

    A backend calls ``sent_at = await pacer.wait(part)`` before a request and
    ``pacer.done(part, sent_at, throttled)`` after it, ``part`` being
    ``pacer.partition(key)`` (the key up to its ``depth``-th ``/``, or its last when it has
    fewer: ``{queue}/{kind}/``, or ``{queue}/{kind}/{shard}/`` in a spread queue, for
    qo's keys at depth 3). Nothing is paced, and a request costs a dict lookup, until a
    request to a prefix is throttled. From then on that prefix's requests leave evenly
    spaced at ``rate`` per second:

    - at the first throttle, ``decrease`` (0.7) times the rate the store accepted there
      over the last ``window`` (1 s); at each later one, ``decrease`` times the rate;
      never below ``floor``. A throttle of a request sent less than a window after the
      last decrease is ignored: the store's count still holds requests sent at the old
      pace;
    - each request sent grows the rate so that sending at the full rate for a second
      grows it by ``growth`` (20 %): a prefix used below its rate does not earn more;
    - ``quiet`` seconds (60) without a throttle, or a rate past ``ceiling``, and the
      prefix is no longer paced.

    Every process pacing this way shares a prefix's capacity as TCP flows share a link
    (additive increase, multiplicative decrease). The engine's ``Backoff`` still
    retries the throttled request; the pacer only spaces what is sent.
    """

    def __init__(self, *, depth: int = 2, floor: float = 5.0, decrease: float = 0.7, growth: float = 0.2,
                 quiet: float = 60.0, ceiling: float = 100_000.0, window: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] | None = None):
        self.depth, self.floor, self.decrease, self.growth = depth, floor, decrease, growth
        self.quiet, self.ceiling, self.window, self._clock, self._sleep = quiet, ceiling, window, clock, sleep
        self._accepted: dict[str, deque[float]] = {}  # per prefix: times of accepted requests
        self._lanes: dict[str, _Lane] = {}
        self.throttles = 0  #: throttled requests seen

    def partition(self, key: str | None) -> str:
        """``key`` up to and including its ``depth``-th ``/`` (its last, if fewer)."""
        key = key or ""
        cut = 0
        for _ in range(self.depth):
            end = key.find("/", cut)
            if end < 0:
                break
            cut = end + 1
        return key[:cut]

    def rate(self, part: str) -> float | None:
        """Requests per second allowed to ``part``; None while it is not paced."""
        lane = self._lanes.get(part)
        return None if lane is None else lane.rate

    async def wait(self, part: str) -> float:
        """Wait for this request's turn to ``part``; returns when it is sent."""
        lane = self._lanes.get(part)
        now = self._clock()
        if lane is None:
            return now
        if lane.rate >= self.ceiling or now - lane.changed_at >= self.quiet:
            del self._lanes[part]
            return now
        slot = max(now, lane.next_at)
        lane.next_at = slot + 1.0 / lane.rate
        lane.rate *= (1.0 + self.growth) ** (1.0 / lane.rate)
        if slot <= now:
            return now
        await (self._sleep or asyncio.sleep)(slot - now)
        return self._clock()

    def done(self, part: str, sent_at: float, throttled: bool) -> None:
        """The request to ``part`` sent at ``sent_at`` was accepted, or throttled."""
        now = self._clock()
        accepted = self._accepted.get(part)
        if accepted is None:
            if len(self._accepted) >= 1024:  # forget prefixes quiet for a window
                self._accepted = {p: d for p, d in self._accepted.items() if d and d[-1] > now - self.window}
            accepted = self._accepted[part] = deque()
        while accepted and accepted[0] <= now - self.window:
            accepted.popleft()
        if not throttled:
            accepted.append(now)
            return
        self.throttles += 1
        lane = self._lanes.get(part)
        if lane is None:  # the first throttle: start from what was accepted
            self._lanes[part] = _Lane(max(self.floor, self.decrease * len(accepted) / self.window), now)
        elif sent_at >= lane.changed_at + self.window:
            lane.rate = max(self.floor, self.decrease * lane.rate)
            lane.changed_at = now
