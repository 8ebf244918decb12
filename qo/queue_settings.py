"""Per-queue settings kept in the bucket (``{queue}/settings.json``), so every worker and
every producer of a queue agrees on them whatever its own configuration says.

What they cover: the defaults of a submitted task (``priority``, ``max_retries``,
``timeout_seconds``), how workers poll (``poll_min``, ``poll_max``) and how they age
waiting tasks (``aging``, ``aging_step_seconds``, ``aging_step_levels``, ``aging_cap``,
``aging_interval``).

Precedence: for a task, an option given to ``submit`` wins, then the queue's setting,
then the built-in default. For a worker, the queue's setting wins over the worker's own
(``WorkerSettings``, flags, environment): that is the point of storing it in the queue.
A setting the queue does not set is left to each worker.

Writes are read-merge-CAS, so two operators setting different names at once both land.
Readers cache the object for ``REFRESH_SECONDS``: a change reaches every worker and
producer within that time (a worker re-reads it in its housekeeping, one GET).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Mapping

import attrs

from .keys import settings_key
from .layout import Layout
from .durations import format_duration, parse_duration
from .errors import InvalidInput, NotFound, PreconditionFailed, QoError, StorageBusy, StorageError
from .model import _finite_number, _short, check_non_negative_int, check_priority, check_seconds, dumps

log = logging.getLogger(__name__)

#: how long a reader trusts its copy of the settings
REFRESH_SECONDS = 30.0
#: the read-merge-CAS of a write is tried this many times against concurrent writers
WRITE_ATTEMPTS = 16
SCHEMA = 1


def _bool(value: Any, field: str) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "on", "true", "yes"):
            return True
        if text in ("0", "off", "false", "no"):
            return False
    if not isinstance(value, bool):
        raise InvalidInput(field, f"{_short(value)} is neither on nor off")
    return value


def _number(kind: type) -> Callable[[Any, str], Any]:
    """A text (from the CLI) becomes an int or float; anything else is checked as is."""

    def parse(value: Any, field: str) -> Any:
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                raise InvalidInput(field, f"{_short(value)} is not a "
                                   f"{'whole number' if kind is int else 'number'}") from None
        return value
    return parse


def _seconds(minimum: float, maximum: float) -> Callable[[Any, str], float]:
    as_float = _number(float)
    return lambda v, f: check_seconds(as_float(v, f), f, minimum=minimum, maximum=maximum)


def _level(low: int) -> Callable[[Any, str], int]:
    as_int = _number(int)

    def check(value: Any, field: str) -> int:
        value = as_int(value, field)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 255:
            raise InvalidInput(field, f"{_short(value)} is not an integer from {low} to 255")
        return value
    return check


#: a retention is at least a minute (far above the time between a task's end and its
#: last reader's look: a waiter polls every second) and at most ten years
RETENTION_MIN, RETENTION_MAX = 60.0, 3650 * 86400.0


def _duration(minimum: float, maximum: float) -> Callable[[Any, str], float]:
    """A duration: ``7d``, ``12h``, ``90m`` or seconds."""

    def parse(value: Any, field: str) -> float:
        if isinstance(value, str):
            value = parse_duration(value, field)
        if not _finite_number(value):
            raise InvalidInput(field, f"{_short(value)} is not a duration (7d, 12h, 90m or seconds)")
        if not minimum <= value <= maximum:  # exact for an int of any size: no float overflow
            shown = format_duration(value) if abs(value) <= 1000 * maximum else _short(value)
            raise InvalidInput(field, f"{shown} is outside {format_duration(minimum)} to "
                               f"{format_duration(maximum)}")
        return float(value)
    return parse


@attrs.frozen
class Spec:
    name: str
    parse: Callable[[Any, str], Any]
    help: str


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("priority", lambda v, f: check_priority(v, f),
         "default priority of a submitted task (0-255 or a level name)"),
    Spec("max_retries", lambda v, f: check_non_negative_int(_number(int)(v, f), f),
         "default retries of a submitted task"),
    Spec("timeout_seconds", _seconds(0.001, 7 * 86400), "default timeout (lease) of a submitted task, seconds"),
    Spec("poll_min", _seconds(0.001, 3600), "a worker's shortest idle poll interval, seconds"),
    Spec("poll_max", _seconds(0.001, 3600), "a worker's longest idle poll interval, seconds"),
    Spec("aging", _bool, "age waiting due tasks (on/off)"),
    Spec("aging_step_seconds", _seconds(0.001, 86400 * 365), "aging: seconds of waiting per step"),
    Spec("aging_step_levels", _level(1), "aging: levels gained per step"),
    Spec("aging_cap", _level(0), "aging: never above this level"),
    Spec("aging_interval", _seconds(0.001, 86400), "aging: seconds between passes on the queue"),
    Spec("retention_completed", _duration(RETENTION_MIN, RETENTION_MAX),
         "completed tasks are deleted this long after they ended (default 7d)"),
    Spec("retention_failed", _duration(RETENTION_MIN, RETENTION_MAX),
         "failed tasks (dead letters) are deleted this long after they ended (default 30d)"),
    Spec("retention_cancelled", _duration(RETENTION_MIN, RETENTION_MAX),
         "cancelled, skipped and expired tasks are deleted this long after they ended (default 7d)"),
]}

#: the retention of finished tasks, by setting, with the built-in values (seconds)
RETENTION_DEFAULTS: dict[str, float] = {"retention_completed": 7 * 86400.0, "retention_failed": 30 * 86400.0,
                                        "retention_cancelled": 7 * 86400.0}

#: the task defaults a queue setting can replace, with their built-in values
TASK_DEFAULTS: dict[str, Any] = {"priority": 128, "max_retries": 3, "timeout_seconds": 300.0}


def _field(name: Any) -> str:
    plain = isinstance(name, str) and name.isprintable() and 0 < len(name) <= 64
    return f"settings.{name if plain else _short(name)}"


def check_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a mapping of setting name -> value; an unknown name or a bad value is an
    ``InvalidInput`` naming it (as ``settings.<name>``)."""
    if not isinstance(values, Mapping):
        raise InvalidInput("settings", "must be a mapping of setting name to value")
    out: dict[str, Any] = {}
    for name, value in values.items():
        spec = SPECS.get(name) if isinstance(name, str) else None
        if spec is None:
            raise InvalidInput(_field(name), f"unknown queue setting (known: {', '.join(SPECS)})")
        out[name] = spec.parse(value, f"settings.{name}")
    if out.get("poll_min", 0) > out.get("poll_max", math.inf):
        raise InvalidInput("settings.poll_max", "must be >= poll_min")
    return out


def check_names(names: Any) -> tuple[str, ...]:
    """Setting names (to unset); an unknown one is an ``InvalidInput`` naming it."""
    for name in names:
        if not isinstance(name, str) or name not in SPECS:
            raise InvalidInput(_field(name), f"unknown queue setting (known: {', '.join(SPECS)})")
    return tuple(names)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``name=value`` from the command line -> (name, parsed value)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InvalidInput("settings", f"{_short(text)} is not NAME=VALUE")
    return name, check_settings({name: value})[name]


def _decode(stored: dict[str, Any], warn: Callable[[str], None] = log.warning) -> dict[str, Any]:
    """The settings this release knows, checked. Bad values are skipped with a warning
    rather than stopping every worker; names a newer release wrote are kept in the
    object (a write merges into them) but not used here."""
    out = {}
    for name, value in stored.items():
        if name not in SPECS:
            continue
        try:
            out.update(check_settings({name: value}))
        except InvalidInput as exc:
            warn(f"queue setting ignored: {exc}")
    if out.get("poll_min", 0) > out.get("poll_max", math.inf):
        warn("queue settings: poll_min > poll_max; both ignored")
        out.pop("poll_min"), out.pop("poll_max")
    return out


def _load(data: bytes, warn: Callable[[str], None] = log.warning) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the settings, the rest of the object: what a write keeps, such as the layout)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        stored = doc["settings"]
        if not isinstance(stored, dict):
            raise TypeError("'settings' is not an object")
    except RecursionError:  # "[[[[..." nested past the parser's depth
        warn("queue settings object is unreadable (nested too deeply); it is replaced on the next write")
        return {}, {}
    except (ValueError, TypeError, KeyError) as exc:
        warn(f"queue settings object is unreadable ({str(exc)[:100]}); it is replaced on the next write")
        return {}, {}
    return stored, {k: v for k, v in doc.items() if k in KEPT}


#: what a settings write carries over from the stored object besides the settings: the
#: queue's key layout (qo/layout.py), recorded once and never changed
KEPT = ("layout", "layout_at")


class QueueSettings:
    """The shared settings of one queue: ``await queue.settings.get()``, ``set(...)``,
    ``unset(...)``. Reads are cached for ``REFRESH_SECONDS`` on the queue's clock."""

    def __init__(self, queue: Any):
        self.queue = queue
        self._values: dict[str, Any] | None = None
        self._read_at = -math.inf
        self._warned: set[str] = set()  # what the last read warned of
        self._warnings: set[str] = set()  # what the read under way warns of

    @property
    def key(self) -> str:
        return settings_key(self.queue.name)

    @property
    def cached(self) -> dict[str, Any]:
        """The last values read (empty before the first read)."""
        return dict(self._values or {})

    async def get(self, *, refresh: bool = False) -> dict[str, Any]:
        """The queue's settings (only those set), from the cache unless it is older than
        ``REFRESH_SECONDS`` or ``refresh``."""
        now = self.queue.clock.now()
        if refresh or self._values is None or now - self._read_at >= REFRESH_SECONDS:
            stored, _ = await self._read()
            self._values, self._read_at = self._decode(stored), now
        return dict(self._values)

    async def task_defaults(self) -> dict[str, Any]:
        """priority, max_retries and timeout_seconds for a task that does not give them.
        A storage failure here falls back to the last values read (or the built-ins):
        a submit does not fail because the settings could not be re-read, unless the store
        is locked (``StorageBusy``: the write would wait the lock out again)."""
        try:
            values = await self.get()
        except StorageBusy:
            raise
        except StorageError as exc:
            log.warning("queue settings could not be read (%s); using the last known", exc)
            values = self.cached
        return {name: values.get(name, default) for name, default in TASK_DEFAULTS.items()}

    async def set(self, values: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """Set some settings (others are kept); returns all of them. Every value is
        checked before anything is written."""
        if values is not None and not isinstance(values, Mapping):
            raise InvalidInput("settings", "must be a mapping of setting name to value")
        changes = check_settings({**(values or {}), **more})
        if not changes:
            raise InvalidInput("settings", "nothing to set")
        return await self._update(lambda current: {**current, **changes})

    async def unset(self, *names: str) -> dict[str, Any]:
        """Remove settings (each worker's own value applies again); returns the rest."""
        names = check_names(names)
        return await self._update(lambda current: {k: v for k, v in current.items() if k not in names})

    def _warn(self, message: str) -> None:
        """Log a warning about the stored object once: a bad value that stays is not
        logged again at every refresh (once it is gone and comes back, it is)."""
        self._warnings.add(message)
        if message not in self._warned:
            log.warning("%s", message)

    def _decode(self, stored: dict[str, Any]) -> dict[str, Any]:
        """``_decode`` with this reader's warnings logged once; ends a read."""
        values = _decode(stored, self._warn)
        self._warned, self._warnings = self._warnings, set()
        return values

    async def _read(self) -> tuple[dict[str, Any], str | None]:
        stored, _, etag = await self._read_all()
        return stored, etag

    async def read_once(self) -> None:
        """Read the object now with one GET and no retry (the caller's own retry covers
        it: the key layout read on a spread key's first use, qo/layout.py)."""
        stored, _, _ = await self._read_all(retry=False)
        self._values, self._read_at = self._decode(stored), self.queue.clock.now()

    async def _read_all(self, retry: bool = True) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        """(settings, the rest of the object, etag); the storage learns the queue's layout."""
        store = self.queue.store
        try:
            if retry:
                blob = await store.backoff.call(lambda: store.storage.get(self.key))
            else:
                blob = await store.storage.get(self.key)
        except NotFound:
            kept: dict[str, Any] = {}
            stored, etag = {}, None
        else:
            (stored, kept), etag = _load(blob.data, self._warn), blob.etag
        learn = getattr(store.storage, "learn", None)
        if learn is not None:
            learn(Layout.from_doc(kept.get("layout"), self.key))
        return stored, kept, etag

    async def record_layout(self, shards: int) -> Layout:
        """Record the queue's key layout (qo/layout.py) beside the settings, merged by CAS
        as every write is: the same layout again writes nothing; another one is refused
        (``InvalidInput`` naming ``shards``): a layout never changes."""
        now = self.queue.clock.now()
        layout = Layout(shards, recorded=True)

        def keep(kept: dict[str, Any]) -> dict[str, Any] | None:
            current = Layout.from_doc(kept.get("layout"), self.key)
            if not current.recorded:
                return {**kept, "layout": layout.to_doc(), "layout_at": now}
            if current.shards != shards:
                raise InvalidInput("shards", f"queue {self.queue.name!r} is laid out in {current.shards} shard"
                                   f"{'s' if current.shards != 1 else ''}; a layout never changes once recorded "
                                   "(make a new queue for another)")
            return None

        await self._update(lambda current: current, keep)
        return layout

    async def _update(self, change: Callable[[dict[str, Any]], dict[str, Any]],
                      keep: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None) -> dict[str, Any]:
        """Read, change, write by CAS; again from the read when another writer won.
        ``keep`` changes what the object holds besides the settings (None: nothing to write)."""
        store = self.queue.store
        for _ in range(WRITE_ATTEMPTS):
            stored, kept, etag = await self._read_all()
            if keep is not None:
                kept = keep(kept)
                if kept is None:
                    self._values, self._read_at = self._decode(stored), self.queue.clock.now()
                    return dict(self._values)
            new = change(stored)
            known = {k: v for k, v in new.items() if k in SPECS}
            check_settings(known)  # e.g. poll_min set above a poll_max set earlier
            doc = dumps({**kept, "schema": SCHEMA, "settings": new, "updated_at": self.queue.clock.now()})
            try:
                if etag is None:
                    await store.backoff.call(lambda: store.storage.put(self.key, doc, if_none_match=True))
                else:
                    await store.backoff.call(lambda: store.storage.put(self.key, doc, if_match=etag))
            except PreconditionFailed:
                continue  # somebody else wrote (or our own write landed unseen): merge again
            self._values, self._read_at = _decode(known), self.queue.clock.now()
            return dict(self._values)
        raise QoError(f"queue settings: {WRITE_ATTEMPTS} concurrent writers won in a row; try again")


#: queue setting -> WorkerSettings field, and -> AgingSettings field
WORKER_FIELDS = {"poll_min": "poll_min", "poll_max": "poll_max"}
AGING_FIELDS = {"aging": "enabled", "aging_step_seconds": "step_seconds", "aging_step_levels": "step_levels",
                "aging_cap": "cap", "aging_interval": "interval"}


def overlay(settings: Any, values: Mapping[str, Any]) -> Any:
    """A worker's ``WorkerSettings`` with the queue's ``values`` in place of its own.

    When the queue sets only one end of the polling range and the worker's other end
    would cross it, that end moves to meet it (poll_min <= poll_max holds)."""
    changes: dict[str, Any] = {field: values[name] for name, field in WORKER_FIELDS.items() if name in values}
    if "poll_min" in changes and "poll_max" not in changes:
        changes["poll_max"] = max(settings.poll_max, changes["poll_min"])
    if "poll_max" in changes and "poll_min" not in changes:
        changes["poll_min"] = min(settings.poll_min, changes["poll_max"])
    aging = {field: values[name] for name, field in AGING_FIELDS.items() if name in values}
    if aging:
        changes["aging"] = attrs.evolve(settings.aging, **aging)
    return attrs.evolve(settings, **changes) if changes else settings


def replaced(own: Any, effective: Any) -> list[str]:
    """What the queue's settings changed in a worker's own, as 'name value (own value)'."""
    out = []
    for name, field in WORKER_FIELDS.items():
        if getattr(own, field) != getattr(effective, field):
            out.append(f"{name} {getattr(effective, field)} (own {getattr(own, field)})")
    for name, field in AGING_FIELDS.items():
        if getattr(own.aging, field) != getattr(effective.aging, field):
            out.append(f"{name} {getattr(effective.aging, field)} (own {getattr(own.aging, field)})")
    return out
