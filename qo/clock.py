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
import logging
import math
import time
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch, on the authoritative clock."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


def utc(ts: float) -> datetime:
    """An aware UTC datetime for an epoch timestamp."""
    return datetime.fromtimestamp(ts, tz=timezone.utc)


#: a step of the local clock or of the offset larger than this is a jump, not a refinement
JUMP_SECONDS = 2.0
#: how long a local clock's jump is bridged on elapsed time while the store's clock
#: (the offset) can make up for it at its next response; past this (an outage) it is followed
COAST_SECONDS = 60.0


def _local_clock() -> float:
    """The local clock (looked up at each call: a process that replaces ``time.time``,
    as the skew tests' worker processes do, moves this clock too)."""
    return time.time()


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)  # Linux


def _elapsed_clock() -> float:
    """Seconds on a clock no one sets, counting a machine's suspend where the system can
    (CLOCK_BOOTTIME: after a suspend the local clock moved, and rightly so)."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


class SystemClock:
    """Local time corrected by ``offset_source.clock_offset`` (server minus local).

    Workers on skewed machines agree because each adds its own offset to the store's
    clock. Three rules keep one process's clock sane when its local clock jumps:

    - a step back of less than ``JUMP_SECONDS`` (the offset estimate refined downwards)
      holds the clock still until real time catches up: FIFO order and leases stay
      monotonic;
    - when the local clock is set (it moves by more than ``JUMP_SECONDS`` against an
      elapsed-time clock no one sets) and the store keeps a clock (an offset), the clock
      goes on by elapsed time from where it was: on S3 or Azure the next response's Date
      header moves the offset by the opposite step and the clock never jumps (a step not
      made up for within ``COAST_SECONDS`` is followed, with a warning). With no offset
      (a local directory store) the machine's clock is the store's: the step is
      followed at once, forward or back, with a warning;
    - a jump of the offset itself (the first estimate, a server whose clock was set) is
      followed at once: the store's clock is the authority.

    ``wall`` and ``elapsed`` are the local and the never-set clock (tests set them).
    """

    def __init__(self, offset_source: Any = None, *, wall: Callable[[], float] | None = None,
                 elapsed: Callable[[], float] | None = None):
        self._source = offset_source
        self._wall = wall or _local_clock
        self._elapsed = elapsed or _elapsed_clock
        self._last = -math.inf
        self._seen: tuple[float, float, float] | None = None  # (wall, elapsed, offset) at the last reading
        self._pending = 0.0  # steps of the local clock that the offset has not made up for
        self._pending_since = 0.0  # elapsed-clock time of the first of them
        self._offset_before = 0.0  # the offset before the first of them

    def _offset(self) -> float:
        try:
            return float(getattr(self._source, "clock_offset", 0.0) or 0.0)
        except (TypeError, ValueError):
            return 0.0

    def now(self) -> float:
        wall, elapsed, offset = self._wall(), self._elapsed(), self._offset()
        if self._seen is not None:
            seen_wall, seen_elapsed, seen_offset = self._seen
            step = wall - (seen_wall + (elapsed - seen_elapsed))
            if abs(step) > JUMP_SECONDS and not seen_offset and not self._pending:
                # no store clock to make up for it (a directory store): the machine's clock
                # is the store's, and every process on the machine follows it at once
                log.warning("the local clock moved by %+.0f s: following it", step)
            elif abs(step) > JUMP_SECONDS:  # the local clock was set: bridged until the offset makes up
                if not self._pending:
                    self._pending_since, self._offset_before = elapsed, seen_offset
                self._pending += step
        self._seen = (wall, elapsed, offset)
        if self._pending:
            if abs(offset - self._offset_before + self._pending) <= JUMP_SECONDS:
                self._pending = 0.0  # the store's clock made up for it: no jump
            elif elapsed - self._pending_since >= COAST_SECONDS:
                log.warning("the local clock moved by %+.0f s and the store's clock did not make up for it "
                            "in %.0f s: following it", self._pending, COAST_SECONDS)
                self._pending = 0.0
        t = wall - self._pending + offset
        if self._last - JUMP_SECONDS <= t < self._last:
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
