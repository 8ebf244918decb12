"""One clock abstraction: the authoritative time that leases and due times follow.

``SystemClock`` is local time plus the storage's clock offset (for S3, estimated from
the server's Date header), so that workers on machines with skewed clocks agree on
lease deadlines. ``FakeClock`` is moved by tests: schedules, aging, leases and rate
limits are tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import datetime, timezone
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch, on the authoritative clock."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


def utc(ts: float) -> datetime:
    """An aware UTC datetime for an epoch timestamp."""
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class SystemClock:
    """Local time corrected by ``offset_source.clock_offset`` (server minus local).

    Never goes backwards: when the offset estimate is refined downwards, the clock
    holds still until real time catches up, so FIFO order and leases stay monotonic.
    """

    def __init__(self, offset_source: Any = None):
        self._source = offset_source
        self._last = 0.0

    def now(self) -> float:
        t = time.time() + float(getattr(self._source, "clock_offset", 0.0) or 0.0)
        if t < self._last:
            return self._last
        self._last = t
        return t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told: ``advance(s)`` or ``set(t)``.

    ``sleep`` waits until the clock has been advanced past its deadline. With
    ``autojump=True`` a sleep instead jumps the clock forward to its own deadline
    (the earliest waiter wins), which drives a whole worker through simulated hours
    as fast as the event loop runs.
    """

    def __init__(self, start: float = 1_800_000_000.0, *, autojump: bool = False):
        self._now = float(start)
        self.autojump = autojump
        self._waiters: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def set(self, ts: float) -> None:
        if ts < self._now:
            raise ValueError("a clock does not go backwards")
        self._now = float(ts)
        self._wake()

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + max(0.0, seconds)
        if self.autojump:
            await asyncio.sleep(0)
            if deadline > self._now:
                self._now = deadline
                self._wake()
            return
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (deadline, next(self._seq), fut))
        await fut

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.get_loop().call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class ScaledClock:
    """Real time sped up ``speed`` times from a shared origin: processes that build it
    with the same ``origin`` and ``real_origin`` agree on the time (multi-process tests
    of rate limits and leases, without waiting real minutes)."""

    def __init__(self, speed: float, origin: float, real_origin: float):
        self.speed, self.origin, self.real_origin = float(speed), float(origin), float(real_origin)

    def now(self) -> float:
        return self.origin + (time.time() - self.real_origin) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)
