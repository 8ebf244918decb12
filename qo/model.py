"""The task model: one attrs class, stored as JSON, with a schema version."""

from __future__ import annotations

import json
import math
import operator
import os
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar

import attrs
import orjson

from . import keys, stored
from .errors import CorruptObject, InvalidInput

SCHEMA_VERSION = 1

PENDING, BLOCKED, RUNNING = "pending", "blocked", "running"
COMPLETED, FAILED, CANCELLED, SKIPPED = "completed", "failed", "cancelled", "skipped"
EXPIRED = "expired"  # not started before its expires_at
STATUSES = (PENDING, BLOCKED, RUNNING, COMPLETED, FAILED, CANCELLED, SKIPPED, EXPIRED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, SKIPPED, EXPIRED})
#: terminal statuses with an index of their own (``keys.ended``): the rare ones, so the
#: happy path (completed) writes nothing more; see docs/architecture.md §5g
ENDED_INDEXED = frozenset({FAILED, CANCELLED, SKIPPED, EXPIRED})

DEFAULT_PRIORITY = 128
#: The cap on a value that always stays inline in its record: a schedule's input (the
#: schedule is read on every scheduler pass). A task's input and output are capped by
#: ``MAX_PAYLOAD_BYTES`` instead and stored apart over ``PAYLOAD_INLINE_BYTES``.
MAX_INPUT_BYTES = 256 * 1024
#: A task's input or a handler's output over this many bytes encoded is stored as an
#: object of its own (``payloads/{id}/...``, docs/architecture.md §5i): the task object
#: is read on every claim and CASed on every change, so it stays small.
PAYLOAD_INLINE_BYTES = 64 * 1024
#: The cap on a task's input and a handler's output, encoded (read at call time: a
#: process may lower it, tests do).
MAX_PAYLOAD_BYTES = 100 * 1024 * 1024


def new_rev() -> str:
    """A nonce written with every change, so a writer can tell whether its write landed."""
    return os.urandom(8).hex()


#: record class -> (its field names, a getter of their values, the names but "extra")
_FIELDS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple], frozenset[str]]] = {}


def record_fields(cls: type) -> tuple[tuple[str, ...], Callable[[Any], tuple], frozenset[str]]:
    """The fields of an attrs record class, looked up once per class (attrs classes are
    not changed after they are defined)."""
    found = _FIELDS.get(cls)
    if found is None:
        names = tuple(f.name for f in attrs.fields(cls))
        get = operator.attrgetter(*names) if len(names) > 1 else (lambda obj: (getattr(obj, names[0]),))
        found = _FIELDS[cls] = (names, get, frozenset(names) - {"extra"})
    return found


#: record class -> (whether every field but "extra" can be passed by position, and
#: their names in ``__init__``'s order): matching 30 keywords to parameters compares
#: strings (the keys of decoded JSON are not interned) and costs 5 us a task
_POSITIONAL: dict[type, tuple[bool, tuple[str, ...]]] = {}


def _positional(cls: type) -> tuple[bool, tuple[str, ...]]:
    fields = attrs.fields(cls)
    params = [f for f in fields if f.init]
    usable = (bool(params) and len(params) == len(fields) and params[-1].name == "extra"
              and not any(f.kw_only for f in params))
    found = _POSITIONAL[cls] = (usable, tuple(f.name for f in params[:-1]))
    return found


class StoredRecord:
    """JSON (de)serialisation for attrs records kept in storage. Fields written by a
    newer release land in ``extra`` and are written back unchanged. Reading checks
    every known field (``FIELD_CHECKS``): a bad one is a ``CorruptObject`` naming it."""

    FIELD_CHECKS: ClassVar[dict[str, Callable[[Any], bool]]] = {}
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    SCHEMA: ClassVar[int] = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        names, get, _ = record_fields(type(self))
        d = dict(zip(names, get(self)))  # as attrs.asdict(recurse=False), in field order
        extra = d.pop("extra")
        return {**extra, **d} if extra else d

    def to_json(self) -> bytes:
        return record_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known = record_fields(cls)[2]
        if known.issuperset(d):  # nothing a newer release wrote
            positional = _POSITIONAL.get(cls) or _positional(cls)
            if len(d) == len(known) and positional[0]:  # every field, as this release writes them:
                return cls(*map(d.__getitem__, positional[1]), extra={})  # by position (5 us less)
            return cls(**d, extra={})
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def from_json(cls, data: bytes, key: str = "?", *, backend: str = "") -> Any:
        """The record stored at ``key``; ``CorruptObject`` if it is not one this release can use."""
        d = stored.decode(data, key, backend=backend)
        try:
            stored.check_fields(d, key, cls.FIELD_CHECKS, required=cls.REQUIRED, backend=backend)
        except CorruptObject as exc:
            schema = d.get("schema")
            if stored.is_int(schema) and schema > cls.SCHEMA:
                raise CorruptObject(key, f"{exc.reason} (written by a newer release: schema {schema}, "
                                    f"this release reads {cls.SCHEMA})", backend=backend, newer=True) from None
            raise
        return cls.from_dict(d)


@attrs.define
class Task(StoredRecord):
    """A task as stored in ``{queue}/tasks/{id}.json``. Times are epoch seconds."""

    id: str
    task_type: str
    input: Any = None
    status: str = PENDING
    priority: int = DEFAULT_PRIORITY
    attempt: int = 0
    max_retries: int = 3
    timeout_seconds: float = 300.0
    available_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    lease_id: str | None = None
    lease_deadline: float | None = None
    worker_id: str | None = None
    output: Any = None
    last_error: dict[str, Any] | None = None
    cancel_requested: bool = False
    depends_on: list[str] = attrs.field(factory=list)
    waiting_on: list[str] = attrs.field(factory=list)  # dependencies not yet completed
    on_dependency_failure: str = "fail"
    rate_limit_key: str | None = None
    #: the input stored apart (``input`` is then None): {"key", "bytes", "sha256"}
    input_ref: dict[str, Any] | None = None
    #: the output stored apart (``output`` is then None): {"key", "bytes", "sha256"}
    output_ref: dict[str, Any] | None = None
    #: epoch seconds: a task not started by then ends ``expired`` instead of running
    #: (checked when a worker claims it); None: never
    expires_at: float | None = None
    #: set (by CAS) before a dependent is written: only then has an ending task edges to read
    has_dependents: bool = False
    #: when its idempotency key's record expires: retention keeps the task until then
    idempotency_expires_at: float | None = None
    #: set when a purge has judged this version deletable (qo/tombstones.py): the task is
    #: gone for every reader, and no writer may change it any more
    purging_at: float | None = None
    rev: str = ""
    schema: int = SCHEMA_VERSION
    #: fields written by a newer release: kept and written back unchanged
    extra: dict[str, Any] = attrs.field(factory=dict, repr=False)

    FIELD_CHECKS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "id": stored.matches(keys.TASK_ID),
        "task_type": stored.matches(keys.TASK_TYPE),
        "input": stored.anything,
        "status": stored.one_of(*STATUSES),
        "priority": lambda v: stored.is_int(v, 0, 255),
        "attempt": stored.is_int,
        "max_retries": stored.is_int,
        "timeout_seconds": stored.is_positive,
        "available_at": stored.is_number,
        "created_at": stored.is_number,
        "updated_at": stored.is_number,
        "started_at": stored.optional(stored.is_number),
        "finished_at": stored.optional(stored.is_number),
        "lease_id": stored.optional(stored.is_str),
        "lease_deadline": stored.optional(stored.is_number),
        "worker_id": stored.optional(stored.is_str),
        "last_error": stored.optional(stored.is_dict),
        "cancel_requested": stored.is_bool,
        "depends_on": stored.is_list_of(stored.matches(keys.TASK_ID)),
        "waiting_on": stored.is_list_of(stored.matches(keys.TASK_ID)),
        "on_dependency_failure": stored.one_of("fail", "skip", "run"),
        "rate_limit_key": stored.optional(stored.is_str),
        "input_ref": stored.optional(lambda v: is_payload_ref(v)),
        "output_ref": stored.optional(lambda v: is_payload_ref(v)),
        "expires_at": stored.optional(stored.is_number),
        "has_dependents": stored.is_bool,
        "idempotency_expires_at": stored.optional(stored.is_number),
        "purging_at": stored.optional(stored.is_number),
        "rev": stored.is_str,
        "schema": stored.is_int,
    }
    REQUIRED: ClassVar[tuple[str, ...]] = ("id", "task_type", "status")

    @classmethod
    def from_json(cls, data: bytes, key: str = "?", *, backend: str = "") -> "Task":
        """The task stored at ``key``; ``CorruptObject`` if it is unusable or its id is
        not the one its key names (a copied or hand-moved object)."""
        task = super().from_json(data, key, backend=backend)
        if key != "?" and not key.endswith(f"/tasks/{task.id}.json"):
            raise CorruptObject(key, f"holds task {task.id}, not the one its key names", backend=backend)
        return task

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def ended_key(self, queue: str) -> str | None:
        """The ``ended/`` index marker of this task as it is now (None: not indexed)."""
        if self.status not in ENDED_INDEXED or self.finished_at is None:
            return None
        return keys.ended(queue, self.status, self.finished_at, self.id, self.task_type)

    def marker_key(self, queue: str, now: float) -> str:
        """The ready or delayed marker that projects this pending task (due within a few
        milliseconds counts as due: a requeue bumps the due time by one)."""
        if self.available_at <= now + 0.005:
            return keys.ready(queue, self.priority, self.available_at, self.id, self.task_type)
        return keys.delayed(queue, self.priority, self.available_at, self.id, self.task_type)


    def public_dict(self) -> dict[str, Any]:
        """What ``--json`` output shows: the stored fields with ISO times."""
        d = self.to_dict()
        for k in ("available_at", "created_at", "updated_at", "started_at", "finished_at", "lease_deadline",
                  "expires_at"):
            if d.get(k) is not None:
                d[k] = iso(d[k])
        return d


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


#: the encoder ``json.dumps`` would build for these options on every call (it keeps no
#: state between calls: one instance serves every caller)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def dumps(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no NaN/Infinity, compact."""
    return _ENCODER.encode(obj).encode()


def record_json(obj: dict[str, Any]) -> bytes:
    """A stored record's JSON (tasks are written twice a run), several times faster than
    ``dumps``: sorted keys, compact, read back as the same values (orjson; a float may be
    spelled ``1e-7`` where ``dumps`` writes ``1e-07``). What orjson refuses (a key that is
    not a string, an int over 64 bits, a lone surrogate) goes to ``dumps``, which keys and
    refuses as ever. A record's values were checked as JSON where they came in (inputs at
    submit, outputs when stored, the rest is qo's own); a NaN only a hand-written object
    can hold is written as null instead of stopping every write of the record."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        return dumps(obj)


# -- validation: every check names its field, and runs before anything is written ----


def check_task_type(value: Any, field: str = "task_type") -> str:
    if not isinstance(value, str) or not keys.TASK_TYPE.match(value):
        raise InvalidInput(field, f"{_short(value)} is not a task type (a letter or _, then up to 127 of "
                           "A-Z a-z 0-9 _ . : -)")
    return value


def is_payload_ref(v: Any) -> bool:
    """A stored reference to a value kept apart: {"key": str, "bytes": int, "sha256": 64 hex}."""
    return (isinstance(v, dict) and isinstance(v.get("key"), str) and stored.is_int(v.get("bytes"))
            and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in v["sha256"]))


def encode_value(value: Any, field: str = "input", limit: int | None = None) -> bytes:
    """``value`` as canonical JSON bytes, checked: JSON-serialisable, finite numbers only,
    at most ``limit`` bytes (default ``MAX_PAYLOAD_BYTES``, read now) and nested at most
    ``stored.MAX_VALUE_DEPTH`` deep, so whatever holds it (a task, a schedule, a payload
    object) is readable again: ``stored.decode`` refuses objects nested deeper than
    ``stored.MAX_DEPTH``. Depth is measured on the encoded text, without recursion."""
    limit = MAX_PAYLOAD_BYTES if limit is None else limit
    too_deep = f"is nested more than {stored.MAX_VALUE_DEPTH} levels deep (arrays and objects); that is the limit"
    try:
        encoded = dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(field, f"must be JSON-serialisable with finite numbers ({exc})") from None
    except RecursionError:  # deeper than the interpreter's recursion limit (or circular)
        raise InvalidInput(field, too_deep) from None
    if len(encoded) > limit:
        raise InvalidInput(field, f"is {len(encoded)} bytes encoded; the limit is {limit}")
    if stored.too_deep(encoded.decode(), stored.MAX_VALUE_DEPTH):
        raise InvalidInput(field, too_deep)
    return encoded


def check_input(value: Any, field: str = "input", limit: int | None = None) -> Any:
    """A detached copy of ``value`` once ``encode_value`` accepts it (at most ``limit``
    bytes, default ``MAX_PAYLOAD_BYTES``): later mutation by the caller changes nothing."""
    return json.loads(encode_value(value, field, limit))


PRIORITY_LEVELS = {"critical": 255, "high": 192, "normal": 128, "low": 64, "background": 0}


def check_priority(value: Any, field: str = "priority") -> int:
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITY_LEVELS:
            return PRIORITY_LEVELS[name]
        try:
            value = int(name)
        except ValueError:
            raise InvalidInput(field, f"{_short(value)} is neither 0-255 nor one of "
                               f"{', '.join(PRIORITY_LEVELS)}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidInput(field, f"{_short(value)} is not an integer from 0 to 255 (higher runs first)")
    return value


def check_non_negative_int(value: Any, field: str, maximum: int = 1000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidInput(field, f"{_short(value)} is not an integer from 0 to {maximum}")
    return value


def _finite_number(value: Any) -> bool:
    """An int or a finite float; a bool is neither, and an int of any size is (compared
    exactly, never turned into a float that would overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def check_seconds(value: Any, field: str, *, minimum: float = 0.001, maximum: float = 7 * 86400) -> float:
    if not _finite_number(value):
        raise InvalidInput(field, f"{_short(value)} is not a number of seconds")
    if not minimum <= value <= maximum:
        raise InvalidInput(field, f"{_short(value)} is outside {minimum}..{maximum} seconds")
    return float(value)


def check_when(value: Any, field: str = "schedule_at") -> float | None:
    """An aware datetime (or None) as epoch seconds; a naive one is an error."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(field, f"{_short(value)} is not a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(field, "must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return value.timestamp()


def check_expires_at(value: Any, now: float, schedule_at: float | None = None,
                     field: str = "expires_at") -> float | None:
    """``expires_at`` (an aware datetime, or None for never) as epoch seconds. It must be
    later than ``now`` and than ``schedule_at``: a task that could never start before it
    expires is a mistake of the caller's, refused before anything is written."""
    when = check_when(value, field)
    if when is None:
        return None
    if when <= now:
        raise InvalidInput(field, f"{iso(when)} is not later than now ({iso(now)})")
    if schedule_at is not None and when <= schedule_at:
        raise InvalidInput(field, f"{iso(when)} is not later than schedule_at ({iso(schedule_at)}): "
                           "the task could never start")
    return when


def check_task_id(value: Any, field: str = "task_id") -> str:
    if not isinstance(value, str) or not keys.TASK_ID.match(value):
        raise InvalidInput(field, f"{_short(value)} is not a task id (24 lowercase hex characters)")
    return value


def is_utf8(value: str) -> bool:
    """False for a string that cannot be stored: one with lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: Any) -> str:
    """``value`` for an error message, at most 60 characters; a value nested too deeply for
    ``repr`` (a 100,000-deep list) is named by its type, not a RecursionError."""
    try:
        r = repr(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply to show>"
    return r if len(r) <= 60 else r[:57] + "..."
