"""Storage that keeps failing: capped backoff, one WARNING per backoff step, and how
long it has been failing.

The store retries a transient error a few times within one call (``qo/store.py``);
what fails beyond that is an outage of this kind of work (listing, a housekeeping
step, writing an outcome). A daemon worker keeps trying, waiting longer each time up
to ``cap``, and says so when the wait grows (and once per ``cap`` at the cap), not on
every attempt. A worker draining the queue (``until_idle``) gives up once storage has
been failing for ``WorkerSettings.storage_failure_limit`` (see ``Worker.run``).

A worker started while the store does not answer waits for it (``wait_until_reachable``):
1 s doubling to 30 s, one line per wait, up to ``WorkerSettings.startup_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable

from .errors import StorageUnavailable

log = logging.getLogger("qo.worker")


class Outage:
    """The failures of one kind of storage work (``what``), on the queue's clock."""

    def __init__(self, what: str, now: Callable[[], float], *, base: float = 0.5, cap: float = 30.0,
                 logger: logging.Logger = log):
        self.what, self._now, self.base, self.cap, self.log = what, now, base, cap, logger
        self.since: float | None = None  # first failure of the current outage
        self.failures = 0
        self.last_error: BaseException | None = None
        self.retry_at = 0.0  # not before then (the caller may wait on its own)
        self._said_at = -float("inf")
        self._said_delay = 0.0

    @property
    def failing(self) -> bool:
        return self.since is not None

    def duration(self) -> float:
        """Seconds the current outage has lasted (0 when there is none)."""
        return 0.0 if self.since is None else self._now() - self.since

    def failed(self, exc: BaseException) -> float:
        """Record a failure; returns how long to wait before trying again (jittered)."""
        now = self._now()
        if self.since is None:
            self.since = now
        self.failures += 1
        self.last_error = exc
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 16))
        if delay > self._said_delay or now - self._said_at >= self.cap:  # a new step, or once per cap
            self._said_delay, self._said_at = delay, now
            self.log.warning("%s failed %d time%s in %.0f s (%s); trying again in %.1f s",
                             self.what, self.failures, "" if self.failures == 1 else "s",
                             now - self.since, _one_line(exc), delay)
        delay *= random.uniform(0.8, 1.0)
        self.retry_at = now + delay
        return delay

    def ok(self) -> None:
        """The work succeeded: the outage (if any) is over."""
        if self.since is not None and self.failures > 1:
            self.log.warning("%s works again after %d failures in %.0f s", self.what, self.failures,
                             self._now() - self.since)
        self.since, self.failures, self.last_error = None, 0, None
        self._said_delay, self._said_at = 0.0, -float("inf")


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


class Outages:
    """The outages of one worker, by kind of work; the longest one says how bad it is."""

    def __init__(self, now: Callable[[], float], **options: Any):
        self._now, self._options = now, options
        self.by_what: dict[str, Outage] = {}

    def __getitem__(self, what: str) -> Outage:
        outage = self.by_what.get(what)
        if outage is None:
            outage = self.by_what[what] = Outage(what, self._now, **self._options)
        return outage

    def longest(self) -> Outage | None:
        failing = [o for o in self.by_what.values() if o.failing]
        return max(failing, key=lambda o: o.duration()) if failing else None


async def wait_until_reachable(probe: Callable[[], Awaitable[Any]], clock: Any, *, timeout: float | None,
                               stopping: asyncio.Event, who: str = "worker", base: float = 1.0,
                               cap: float = 30.0, logger: logging.Logger = log) -> bool:
    """Call ``probe`` until it no longer raises ``StorageUnavailable``, waiting on ``clock``
    between tries (``base`` doubling to ``cap``, jittered, one WARNING per wait), as a
    worker does at start-up. Any other error is not an outage (bad URL or credentials, a
    refused store): it is raised at once. False if ``stopping`` was set first;
    ``StorageUnavailable`` once ``timeout`` seconds passed without an answer."""
    started = clock.now()
    deadline = None if timeout is None else started + timeout
    failures = 0
    while not stopping.is_set():
        try:
            # each try ends by the deadline; the one made at the deadline gets a moment
            ends = None if deadline is None else max(deadline, clock.now() + min(1.0, timeout or 1.0))
            answered = await _before(probe(), clock, ends, stopping)
        except StorageUnavailable as exc:
            failures += 1
            reason = _reason(exc)
            now = clock.now()
            if deadline is not None and now >= deadline:
                raise _gave_up(timeout, reason) from None
            delay = min(cap, base * 2 ** min(failures - 1, 16)) * random.uniform(0.8, 1.0)
            if deadline is not None:
                delay = min(delay, deadline - now)
            logger.warning("%s: store unreachable (%s); retrying in %.1f s", who, reason, delay)
            if await _before(clock.sleep(delay), clock, None, stopping) is _STOPPED:
                return False
            continue
        if answered is _STOPPED:
            return False
        if answered is _TIMED_OUT:
            raise _gave_up(timeout, "no answer yet")
        if failures:
            logger.warning("%s: store reachable after %.0f s; starting", who, clock.now() - started)
        return True
    return False


_STOPPED, _TIMED_OUT = object(), object()


async def _before(work: Awaitable[Any], clock: Any, deadline: float | None, stopping: asyncio.Event) -> Any:
    """Await ``work`` unless ``stopping`` is set or ``deadline`` passes first (then it is
    cancelled): None when it ended (what it raised is raised), else ``_STOPPED`` or
    ``_TIMED_OUT``."""
    job = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    timer = asyncio.ensure_future(clock.sleep(deadline - clock.now())) if deadline is not None else None
    try:
        await asyncio.wait({job, stop, *([timer] if timer else [])}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (stop, timer):
            if f is not None:
                f.cancel()
        if not job.done():
            job.cancel()
    if job.done() and not job.cancelled():
        job.result()  # raises what the work raised
        return None
    return _STOPPED if stopping.is_set() else _TIMED_OUT


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]


def _gave_up(timeout: float | None, reason: str) -> StorageUnavailable:
    return StorageUnavailable(f"the store did not answer within the start-up timeout ({timeout:g} s): {reason}")
