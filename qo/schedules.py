"""``queue.schedules``: add, list, get, remove, pause, resume and trigger recurring schedules.

A schedule lives in one object (``qo/schedule_model.py``); the scheduler daemon
(``qo/scheduler.py``) fires it. Everything here validates before it writes: a bad cron
expression, an unknown timezone, a duplicate name or an unknown catch-up policy is an
``InvalidInput`` naming the field, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from typing import Any

from .clock import utc
from .errors import CorruptObject, IdempotencyConflict, InvalidInput, PluginError, PreconditionFailed
from .idempotency import SCHEDULER_SCOPE, check_request, decode_record, record_key
from .model import MAX_INPUT_BYTES, Task, _short, check_input, check_non_negative_int, check_seconds
from .schedule_model import (
    TASK_OPTIONS,
    Schedule,
    ScheduleNotFound,
    ScheduleStore,
    check_catch_up,
    check_cron_length,
    check_name,
    check_timezone,
    name_of,
)

__all__ = ["Schedules", "Schedule", "ScheduleNotFound", "IDEMPOTENCY_SCOPE", "MAX_LATENESS_SECONDS"]

#: Fire times are submitted with idempotency keys in this scope (``Schedule.fire_key``).
#: Reserved for the scheduler (``qo.idempotency.SCHEDULER_SCOPE``): a user submit with it
#: is refused, so nobody can pre-empt a fire by guessing its key. Its records stay in
#: the namespace ``custom.schedule``, where fires recorded before the reservation are.
IDEMPOTENCY_SCOPE = SCHEDULER_SCOPE
#: No fire time later than this is ever submitted, whatever the catch-up policy ...
MAX_LATENESS_SECONDS = 7 * 86400.0
#: ... and its idempotency key lives twice as long, so a fire time submitted again (by a
#: scheduler that found the schedule not yet advanced) always finds its first task.
IDEMPOTENCY_TTL_DAYS = 2 * MAX_LATENESS_SECONDS / 86400


class Schedules:
    """The recurring schedules of one queue: ``queue.schedules``."""

    def __init__(self, queue: Any):
        self.queue = queue
        self.store = ScheduleStore(queue.storage, queue.name, queue.store.backoff, queue.store.bad)

    # -- fire times ----------------------------------------------------------------

    def next_after(self, schedule: Schedule, ts: float) -> float:
        """The first fire time strictly after ``ts`` (epoch), through ``qo_next_fire``.

        ``InvalidInput`` when no plugin understands the schedule's ``cron`` (or the cron
        plugin finds it malformed, or never firing)."""
        answer = self.queue.plugins.hook.qo_next_fire(schedule=schedule, after=utc(ts))
        if answer is None:
            raise InvalidInput("cron", f"{_short(schedule.cron)} is neither a cron expression (5 fields, or 6 with "
                               "seconds last) nor a kind of schedule a plugin understands")
        if not isinstance(answer, datetime) or answer.tzinfo is None or answer.utcoffset() is None:
            raise PluginError(f"qo_next_fire returned {answer!r} for schedule {schedule.name!r}; "
                              "expected an aware datetime")
        return answer.timestamp()

    async def submit_fire(self, schedule: Schedule, fire_at: float) -> Task:
        """Submit the task of fire time ``fire_at``, at most once however often it is called:
        the idempotency key is the schedule's and the fire time's (``Schedule.fire_key``)."""
        return await self._submit(schedule, schedule.fire_key(fire_at))

    async def _submit(self, schedule: Schedule, key: str) -> Task:
        """Submit ``schedule``'s task under idempotency key ``key`` in the scheduler's
        reserved scope: the one submit path allowed to use it, so it does what
        ``queue.submit`` does with the scheduler's flag on the request."""
        queue = self.queue
        request = check_request(key, IDEMPOTENCY_SCOPE, IDEMPOTENCY_TTL_DAYS, scheduler=True)
        assert request is not None  # a key is given
        task, _ = queue._prepare(schedule.task_type, schedule.input, schedule.task_options(),
                                 await queue.settings.task_defaults())
        namespace = queue.idempotency.namespace(request, task.task_type)  # a plugin's bad answer fails here
        try:
            return await queue._submit(task, request)
        except IdempotencyConflict:
            # the key names a task with another input (the record was edited between a
            # fire and its advance): that task is this fire time's one task
            rk = record_key(queue.name, namespace, key)
            blob = await queue.store.backoff.call(lambda: queue.storage.get(rk))
            try:
                record = decode_record(blob.data, rk, backend=queue.storage.name)
            except CorruptObject as exc:  # garbage since the conflict: the next pass repairs it
                queue.store.bad.report(exc, "fire not submitted this pass")
                raise
            return await queue.get(record["task_id"])

    # -- the API ---------------------------------------------------------------------

    async def add(
        self,
        name: str,
        *,
        cron: str,
        task_type: str,
        input: Any = None,
        timezone: str = "UTC",
        catch_up: str = "latest",
        max_catch_up: int = 100,
        grace_seconds: float = 60.0,
        priority: int | str | None = None,
        max_retries: int | None = None,
        timeout_seconds: float | None = None,
        enabled: bool = True,
    ) -> Schedule:
        """Create schedule ``name``: every fire time of ``cron`` in ``timezone`` submits
        ``task_type`` with ``input`` and the task options.

        ``catch_up`` decides what fires after the schedulers were down: ``skip`` only
        fire times at most ``grace_seconds`` late, ``latest`` those and the most recent
        missed time once, ``all`` every missed time (the most recent ``max_catch_up``,
        none older than 7 days). A duplicate name is ``InvalidInput("name")``. Task options
        not given are not stored: each fire takes the queue's settings of that time.
        """
        check_name(name)
        if not isinstance(cron, str):
            raise InvalidInput("cron", "must be a string such as '*/5 * * * *'")
        check_cron_length(cron)  # whatever plugin parses it: a long one is costly to every fire
        check_timezone(timezone)
        check_catch_up(catch_up)
        check_non_negative_int(max_catch_up, "max_catch_up", 10_000)
        check_seconds(grace_seconds, "grace_seconds", minimum=0.0, maximum=86400.0)
        if not isinstance(enabled, bool):
            raise InvalidInput("enabled", "must be True or False")
        given = {"priority": priority, "max_retries": max_retries, "timeout_seconds": timeout_seconds}
        task = self.queue.build_task(task_type, input, **given)  # the submit validators
        # its input stays inline in the schedule record, read on every pass: the small cap
        check_input(input, "input", MAX_INPUT_BYTES)
        now = self.queue.clock.now()
        schedule = Schedule(
            name=name, cron=" ".join(cron.split()), task_type=task.task_type, timezone=timezone,
            input=task.input, options={k: getattr(task, k) for k in TASK_OPTIONS if given[k] is not None},
            enabled=enabled,
            catch_up=catch_up, max_catch_up=max_catch_up, grace_seconds=float(grace_seconds),
            created_at=now, updated_at=now,
        )
        schedule.next_fire_at = self.next_after(schedule, now)
        try:
            await self.store.create(schedule)
        except PreconditionFailed:
            raise InvalidInput("name", f"a schedule named {name!r} already exists in queue "
                               f"{self.queue.name!r}") from None
        return schedule

    async def get(self, name: str) -> Schedule:
        """The schedule as stored; ``ScheduleNotFound`` if there is none."""
        return (await self.store.load(check_name(name)))[0]

    async def list(self) -> list[Schedule]:
        """Every schedule of the queue, by name (one LIST, then one GET each)."""
        entries = await self.store.entries()
        sem = asyncio.Semaphore(16)

        async def load(name: str) -> Schedule | None:
            async with sem:
                try:
                    return (await self.store.load(name))[0]
                except (ScheduleNotFound, CorruptObject):
                    return None  # removed since the listing; unreadable (reported once)

        loaded = await asyncio.gather(*(load(name_of(e.key)) for e in entries))
        return [s for s in loaded if s is not None]

    async def remove(self, name: str) -> Schedule | None:
        """Delete the schedule; returns it as it was (None if it was unreadable: an
        operator must be able to remove a bad object). A fire in flight may still finish."""
        try:
            schedule: Schedule | None = (await self.store.load(check_name(name)))[0]
        except CorruptObject:
            schedule = None
        await self.store.delete(name)
        return schedule

    async def pause(self, name: str) -> Schedule:
        """Stop firing (fire times while paused are never fired). Idempotent."""
        return await self._change(name, enabled=False)

    async def resume(self, name: str) -> Schedule:
        """Fire again, from the next fire time after now (not the ones missed while paused)."""
        return await self._change(name, enabled=True)

    async def _change(self, name: str, *, enabled: bool) -> Schedule:
        check_name(name)
        while True:
            schedule, etag = await self.store.load(name)
            if schedule.enabled == enabled:
                return schedule
            now = self.queue.clock.now()
            schedule.enabled, schedule.updated_at = enabled, now
            if enabled:
                schedule.next_fire_at = self.next_after(schedule, now)
                schedule.last_error = None
            try:
                await self.store.replace(schedule, etag)
                return schedule
            except PreconditionFailed:
                continue  # changed (a scheduler fired it) or removed: look again

    async def trigger(self, name: str) -> Task:
        """Fire once now, outside the cron times: a new task each call; the schedule's
        fire state (``next_fire_at``) is not touched. Works on a paused schedule too."""
        schedule, _ = await self.store.load(check_name(name))
        return await self._submit(schedule, f"{schedule.name}@trigger-{os.urandom(8).hex()}#{schedule.uid}")
