"""The scheduler daemon: fires every recurring schedule of a queue at its times.

Any number of schedulers may run at once, on any machines: every fire time produces
exactly one task, even when a scheduler dies mid-fire. The protocol, for one schedule
(docs/architecture.md, "Schedules"):

1. read the schedule (its etag comes with it);
2. if ``next_fire_at <= now``: choose the fire times to emit (catch-up policy) and, for
   each, **submit first**, with the idempotency key ``Schedule.fire_key(t)``;
3. **then** CAS the schedule forward (``next_fire_at`` = the first time after now).

A scheduler that dies between 2 and 3 leaves the schedule un-advanced: the next one
submits the same fire times again and idempotency hands back the same tasks (no double
fire). Advancing first would lose the fire time if it died before submitting (a missed
fire). A scheduler that loses the CAS re-reads and finds the schedule advanced.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
from typing import Any, Awaitable, Callable, Iterable

import attrs

from .errors import CorruptObject, InvalidInput, PluginError, PreconditionFailed, QoError
from .schedule_model import Schedule, ScheduleNotFound, name_of
from .schedules import MAX_LATENESS_SECONDS

log = logging.getLogger(__name__)

#: Fire times found within the grace window at most (a per-second cron, a long grace).
MAX_ON_TIME = 1000
#: Lost CAS races on one schedule in one pass before leaving it to the next pass.
MAX_ROUNDS = 16


@attrs.frozen
class Fired:
    """One fire time this scheduler fired (it won the advance of the schedule)."""

    name: str
    fire_at: float
    task_id: str


@attrs.frozen
class Plan:
    fire: list[float]  # fire times to submit, oldest first
    next_fire_at: float | None


def recent_times(start: float, end: float, limit: int, next_after: Callable[[float], float],
                 *, include_end: bool = True) -> list[float]:
    """The last ``limit`` fire times in ``[start, end]`` (``[start, end)`` without
    ``include_end``), oldest first. Looks back through windows growing fourfold, so the
    cost follows ``limit``, not the length of an outage."""
    if limit <= 0 or start > end:
        return []
    width = 60.0
    while True:
        low = max(start, end - width)
        times: collections.deque[float] = collections.deque(maxlen=limit)
        t = next_after(low - 0.0005)
        while t <= end if include_end else t < end:
            times.append(t)
            t = next_after(t)
        if len(times) >= limit or low <= start:
            return list(times)
        width *= 4


def plan(schedule: Schedule, now: float, next_after: Callable[[float], float]) -> Plan:
    """Which fire times to emit now, and the next fire time after them.

    Due times at most ``grace_seconds`` late are on time and fire under every policy;
    older ones were missed: ``skip`` drops them, ``latest`` fires the most recent,
    ``all`` the most recent ``max_catch_up``. None older than ``MAX_LATENESS_SECONDS``.
    """
    first = schedule.next_fire_at
    if not schedule.enabled or first is None or first > now:
        return Plan([], first)
    start = max(first, now - MAX_LATENESS_SECONDS)
    on_time_from = max(start, now - schedule.grace_seconds)
    on_time = recent_times(on_time_from, now, MAX_ON_TIME, next_after)
    keep = {"skip": 0, "latest": 1, "all": schedule.max_catch_up}.get(schedule.catch_up, 1)
    missed = recent_times(start, on_time_from, keep, next_after, include_end=False)
    return Plan(missed + on_time, next_after(now))


class Scheduler:
    """Fires the due schedules of ``queue``; ``run()`` until stopped, or ``run_once()``.

    One pass costs one LIST of ``schedules/`` plus a GET of each schedule whose etag
    changed since the last pass (none for an unchanged one: the LIST returns etags).
    """

    def __init__(self, queue: Any, *, poll_max: float = 1.0, jitter: float = 0.1, concurrency: int = 8):
        self.queue = queue
        self.schedules = queue.schedules
        self.store = self.schedules.store
        self.clock = queue.clock
        self.poll_max, self.jitter, self.concurrency = poll_max, jitter, concurrency
        self._cache: dict[str, tuple[str, Schedule]] = {}  # name -> (etag, schedule)
        self.stats: collections.Counter[str] = collections.Counter()

    # -- one pass ----------------------------------------------------------------------

    async def run_once(self, now: float | None = None) -> list[Fired]:
        """List the schedules, fire the due ones; returns what this scheduler fired."""
        entries = await self.store.entries()
        # the time after the LIST: a scheduler's first response is what sets the clock of
        # a machine whose own is off (S3, Azure: the Date header), never before it
        now = self.clock.now() if now is None else now
        listed = {name_of(e.key): e.etag for e in entries}
        for name in set(self._cache) - set(listed):
            del self._cache[name]
        fired: list[Fired] = []
        sem = asyncio.Semaphore(self.concurrency)

        async def one(name: str, etag: str) -> None:
            async with sem:
                try:
                    fired.extend(await self._visit(name, etag, now))
                except CorruptObject:
                    self.stats["bad_objects"] += 1  # reported (once) by the store
                except QoError as exc:
                    self.stats["errors"] += 1
                    log.warning("scheduler: schedule %r: %s", name, exc)
                except Exception:  # a plugin's or our bug costs this schedule, not the others
                    self.stats["errors"] += 1
                    log.exception("scheduler: schedule %r", name)

        await _all(one(name, etag) for name, etag in listed.items())
        self.stats["passes"] += 1
        return sorted(fired, key=lambda f: (f.fire_at, f.name))

    async def _visit(self, name: str, listed_etag: str, now: float) -> list[Fired]:
        cached = self._cache.get(name)
        if cached is not None and cached[0] == listed_etag:
            etag, schedule = cached  # unchanged since we read it: no GET
        elif self.store.bad.known(self.store.key(name), listed_etag):
            return []  # the same unreadable object as last pass: reported already, no GET
        else:
            try:
                loaded = await self._load(name)
            except CorruptObject as exc:
                self._cache.pop(name, None)
                self.store.bad.remember(exc.key, listed_etag)  # reported by the store; skip this version
                raise
            if loaded is None:
                return []
            schedule, etag = loaded
        if not _due(schedule, now):
            return []
        return await self.fire(schedule, etag, now)

    async def _load(self, name: str) -> tuple[Schedule, str] | None:
        """Read a schedule and remember it with its etag; None (and forgotten) if removed."""
        try:
            schedule, etag = await self.store.load(name)
        except ScheduleNotFound:
            self._cache.pop(name, None)
            return None
        self._cache[name] = (etag, schedule)
        return schedule, etag

    async def fire(self, schedule: Schedule, etag: str, now: float) -> list[Fired]:
        """Submit the due fire times of ``schedule``, then advance it by CAS; on a lost
        race re-read and go on from what the winner left."""
        name = schedule.name
        for _ in range(MAX_ROUNDS):
            if not _due(schedule, now):
                return []
            try:
                planned = plan(schedule, now, functools.partial(self.schedules.next_after, schedule))
                submitted = []
                for t in planned.fire:
                    if self.clock.now() - t > MAX_LATENESS_SECONDS:
                        continue  # we stalled: its idempotency key may be gone, never re-submit
                    task = await self.schedules.submit_fire(schedule, t)
                    submitted.append(Fired(name, t, task.id))
                new = attrs.evolve(schedule, next_fire_at=planned.next_fire_at, updated_at=self.clock.now(),
                                   fired=schedule.fired + len(submitted), last_error=None)
                if submitted:
                    new.last_fire_at, new.last_task_id = submitted[-1].fire_at, submitted[-1].task_id
            except (InvalidInput, PluginError) as exc:
                # a schedule that can never fire (a hand-edited record, a plugin gone):
                # stop it and say why, rather than failing on every pass
                submitted, new = [], attrs.evolve(schedule, enabled=False, last_error=str(exc),
                                                  updated_at=self.clock.now())
                log.error("scheduler: schedule %r paused: %s", name, exc)
            try:
                etag = await self.store.replace(new, etag)
            except PreconditionFailed:
                self.stats["lost_races"] += 1
                loaded = await self._load(name)
                if loaded is None:
                    return []
                schedule, etag = loaded
                continue
            self._cache[name] = (etag, new)
            for f in submitted:
                log.info("scheduler: %s fired %s -> task %s", name, new.local(f.fire_at), f.task_id)
            self.stats["fired"] += len(submitted)
            return submitted
        return []

    # -- the daemon --------------------------------------------------------------------

    def next_wake(self) -> float | None:
        """The earliest next fire time among the schedules seen, if any."""
        times = [s.next_fire_at for _, s in self._cache.values() if s.enabled and s.next_fire_at is not None]
        return min(times) if times else None

    async def run(self, stop_event: asyncio.Event | None = None) -> collections.Counter[str]:
        """Pass after pass until ``stop_event`` is set: wakes at the next fire time (plus
        up to ``jitter`` s, so racing schedulers mostly find the work done) and at least
        every ``poll_max`` s to see new and changed schedules. Returns counters."""
        stop = stop_event or asyncio.Event()
        while not stop.is_set():
            delay = self.poll_max
            try:
                await self.run_once()
                wake = self.next_wake()
                if wake is not None:
                    delay = min(self.poll_max, max(0.05, wake - self.clock.now() + random.uniform(0, self.jitter)))
            except QoError as exc:
                self.stats["errors"] += 1
                log.warning("scheduler: pass failed: %s", exc)
            except Exception:  # a plugin's or our bug: keep the daemon alive, say it loudly
                self.stats["errors"] += 1
                log.exception("scheduler: pass failed")
            await self._sleep(delay, stop)
        return self.stats

    async def _sleep(self, seconds: float, stop: asyncio.Event) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()


def _due(schedule: Schedule, now: float) -> bool:
    return schedule.enabled and schedule.next_fire_at is not None and schedule.next_fire_at <= now


async def _all(coros: Iterable[Awaitable[None]]) -> None:
    """Run concurrently; on the first exception cancel the rest and raise it unwrapped."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
