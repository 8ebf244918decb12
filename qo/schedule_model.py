"""The recurring-schedule record, its keys and validators, and its typed storage I/O.

One object per schedule, ``{queue}/schedules/{name}.json``, holds both the definition
(cron, timezone, task type, input, options, catch-up policy) and the fire state
(``next_fire_at``, ``last_fire_at``, ``last_task_id``). Every change is a CAS on it,
and every write carries a fresh ``rev`` so a writer whose response was lost can tell
whether its write landed (as for tasks, see ``qo/store.py``).
"""

from __future__ import annotations

import functools
import os
import re
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from . import stored
from .errors import CorruptObject, InvalidInput, NotFound, PreconditionFailed, ScheduleNotFound, StorageUnavailable
from .model import StoredRecord, _short, iso, new_rev
from .store import Backoff
from .stored import BadObjects

SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}\Z")
CATCH_UP_POLICIES = ("skip", "latest", "all")
SCHEMA_VERSION = 1
#: The task options a schedule passes to every task it fires.
TASK_OPTIONS = ("priority", "max_retries", "timeout_seconds")
#: Longest schedule expression (``cron``) accepted. Parsing costs about 2 us a character
#: (croniter, on every fire computation), and the record is read on every scheduler pass.
#: 256 holds any hand-written cron: a field listing all 60 minutes one by one is 169
#: characters, and the other fields then fit as lists or ranges. More is not a schedule
#: a person wrote; split it into several schedules.
MAX_CRON_LENGTH = 256


def schedules_prefix(queue: str) -> str:
    return f"{queue}/schedules/"


def schedule_key(queue: str, name: str) -> str:
    return f"{queue}/schedules/{name}.json"


def name_of(key: str) -> str:
    """The schedule name of a listed key."""
    return key.rsplit("/", 1)[-1].removesuffix(".json")


# -- validation: each check names its field ----------------------------------------


def check_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not SCHEDULE_NAME.match(value):
        raise InvalidInput(field, f"{_short(value)} is not a schedule name (a letter or digit, then up to 127 "
                           "of A-Z a-z 0-9 _ . : -)")
    return value


@functools.lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def check_cron_length(value: Any, field: str = "cron") -> Any:
    """``value`` unchanged unless it is a string longer than ``MAX_CRON_LENGTH``: then an
    ``InvalidInput`` naming ``field``, decided by ``len`` alone (nothing parses it first)."""
    if isinstance(value, str) and len(value) > MAX_CRON_LENGTH:
        raise InvalidInput(field, f"is {len(value)} characters long; the limit is {MAX_CRON_LENGTH}")
    return value


def check_timezone(value: Any, field: str = "timezone") -> ZoneInfo:
    """The ``ZoneInfo`` of an IANA name (``Europe/Berlin``, ``UTC``)."""
    if isinstance(value, str) and 0 < len(value) <= 64 and ".." not in value and not value.startswith("/"):
        try:
            return _zone(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise InvalidInput(field, f"{_short(value)} is not a known IANA timezone (e.g. 'Europe/Berlin', "
                       "'America/New_York', 'UTC')")


def check_catch_up(value: Any, field: str = "catch_up") -> str:
    if value not in CATCH_UP_POLICIES:
        raise InvalidInput(field, f"{_short(value)} is not one of {', '.join(CATCH_UP_POLICIES)} (skip: fire only "
                           "times not yet missed; latest: the most recent missed time once; all: every missed "
                           "time, up to max_catch_up)")
    return value


# -- the record ------------------------------------------------------------------------


@attrs.define
class Schedule(StoredRecord):
    """A recurring schedule as stored. Times are epoch seconds (UTC)."""

    name: str
    cron: str
    task_type: str
    timezone: str = "UTC"
    input: Any = None
    options: dict[str, Any] = attrs.field(factory=dict)  # priority, max_retries, timeout_seconds
    enabled: bool = True
    catch_up: str = "latest"
    max_catch_up: int = 100
    #: a fire time at most this late is on time: it fires under every catch-up policy
    grace_seconds: float = 60.0
    next_fire_at: float | None = None
    last_fire_at: float | None = None
    last_task_id: str | None = None
    fired: int = 0  # fire times fired so far (trigger not counted)
    last_error: str | None = None
    #: random per add: idempotency keys of a removed and re-added schedule never collide
    uid: str = attrs.field(factory=lambda: os.urandom(6).hex())
    created_at: float = 0.0
    updated_at: float = 0.0
    rev: str = ""
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = attrs.field(factory=dict, repr=False)

    FIELD_CHECKS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "name": stored.matches(SCHEDULE_NAME),
        "cron": stored.is_str,  # parsed (and refused, pausing the schedule) where it fires
        "task_type": stored.is_str,
        "timezone": stored.is_str,
        "input": stored.anything,
        "options": stored.is_dict,
        "enabled": stored.is_bool,
        "catch_up": stored.is_str,
        "max_catch_up": lambda v: stored.is_int(v, 0, 10_000),
        "grace_seconds": lambda v: stored.is_number(v) and 0 <= v <= 86400,
        "next_fire_at": stored.optional(stored.is_number),
        "last_fire_at": stored.optional(stored.is_number),
        "last_task_id": stored.optional(stored.is_str),
        "fired": stored.is_int,
        "last_error": stored.optional(stored.is_str),
        "uid": stored.is_str,
        "created_at": stored.is_number,
        "updated_at": stored.is_number,
        "rev": stored.is_str,
        "schema": stored.is_int,
    }
    REQUIRED: ClassVar[tuple[str, ...]] = ("name", "cron", "task_type")

    def fire_key(self, fire_at: float) -> str:
        """The idempotency key of one fire time: every scheduler computes the same one."""
        return f"{self.name}@{int(round(fire_at * 1000))}#{self.uid}"

    def task_options(self) -> dict[str, Any]:
        """The submit options of the tasks this schedule fires."""
        return {k: v for k, v in self.options.items() if k in TASK_OPTIONS}

    def zone(self) -> ZoneInfo:
        return check_timezone(self.timezone)

    def local(self, ts: float | None) -> str | None:
        """``ts`` as ISO time in the schedule's timezone (UTC if that is unknown here)."""
        if ts is None:
            return None
        try:
            tz: Any = self.zone()
        except InvalidInput:
            tz = timezone.utc
        return datetime.fromtimestamp(ts, tz=tz).isoformat(timespec="seconds")

    def public_dict(self) -> dict[str, Any]:
        """What ``--json`` shows: stored fields, UTC ISO times, and the fire times in the
        schedule's own timezone (``*_local``)."""
        d = self.to_dict()
        for k in ("next_fire_at", "last_fire_at"):
            d[k + "_local"] = self.local(d[k])
        for k in ("next_fire_at", "last_fire_at", "created_at", "updated_at"):
            if d.get(k) is not None:
                d[k] = iso(d[k])
        return d


# -- storage ---------------------------------------------------------------------------


class ScheduleStore:
    """Typed, retried reads and conditional writes of one queue's schedules."""

    def __init__(self, storage: Any, queue: str, backoff: Backoff | None = None, bad: BadObjects | None = None):
        self.storage, self.queue = storage, queue
        self.backoff = backoff or Backoff()
        self.bad = bad if bad is not None else BadObjects()

    def key(self, name: str) -> str:
        return schedule_key(self.queue, name)

    async def entries(self) -> list[Any]:
        """Every listed schedule object (key, etag), in name order."""
        out: list[Any] = []
        cursor = None
        while True:
            page = await self.backoff.call(
                lambda: self.storage.list(schedules_prefix(self.queue), start_after=cursor, limit=1000))
            out += [e for e in page if e.key.endswith(".json")
                    and "/" not in e.key[len(schedules_prefix(self.queue)):]]  # not a nested store's
            if len(page) < 1000:
                return out
            cursor = page[-1].key

    async def load(self, name: str) -> tuple[Schedule, str]:
        """The schedule and its etag; ``ScheduleNotFound`` if there is none."""
        try:
            blob = await self.backoff.call(lambda: self.storage.get(self.key(name)))
        except NotFound:
            raise ScheduleNotFound(name) from None
        return self.decode(blob.data, name), blob.etag

    def decode(self, data: bytes, name: str) -> Schedule:
        """The schedule in ``data``; ``CorruptObject`` (reported once) if unusable, or if
        it names another schedule than its key."""
        key = self.key(name)
        try:
            schedule = Schedule.from_json(data, key, backend=self.storage.name)
            if schedule.name != name:
                raise CorruptObject(key, f"holds schedule {schedule.name!r}, not the one its key names",
                                    backend=self.storage.name)
        except CorruptObject as exc:
            self.bad.report(exc)
            raise
        return schedule

    async def create(self, schedule: Schedule) -> str:
        """Create-only; ``PreconditionFailed`` if the name is taken (by someone else)."""
        return await self._write(schedule, None)

    async def replace(self, schedule: Schedule, etag: str) -> str:
        """CAS over ``etag``; ``PreconditionFailed`` if it changed or was removed."""
        return await self._write(schedule, etag)

    async def _write(self, schedule: Schedule, etag: str | None) -> str:
        schedule.rev = new_rev()
        data, key = schedule.to_json(), self.key(schedule.name)
        for attempt in range(1, self.backoff.attempts + 1):
            try:
                if etag is None:
                    return await self.storage.put(key, data, if_none_match=True)
                return await self.storage.put(key, data, if_match=etag)
            except StorageUnavailable as exc:
                if attempt == self.backoff.attempts:
                    raise
                await self.backoff.pause(attempt, exc)
                try:  # the outcome is unknown: our rev stored means it landed
                    blob = await self.backoff.call(lambda: self.storage.get(key))
                except NotFound:
                    if etag is None:
                        continue
                    raise PreconditionFailed("schedule removed", backend=self.storage.name, key=key) from None
                if self.decode(blob.data, schedule.name).rev == schedule.rev:
                    return blob.etag
                if blob.etag != etag:
                    raise PreconditionFailed("changed by another writer", backend=self.storage.name, key=key)
        raise AssertionError("unreachable")

    async def delete(self, name: str) -> None:
        await self.backoff.call(lambda: self.storage.delete(self.key(name)))
