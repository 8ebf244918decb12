"""Idempotency keys: the same key in the same scope names the same task until it expires.

Write order (docs/architecture.md, "Idempotency"): the record ``idem/{namespace}/
{sha256(key)}.json`` is created first, create-only, naming the id the task *will* have.
Whoever wins that race writes the task; whoever loses reads the record and returns the
task it names. If that task does not exist yet (its producer is slow or died between
its writes), the loser writes it itself under the recorded id, create-only: the id is
the record's, so at most one task can ever exist for the key, and a dead producer
never leaves the key stuck until its TTL.

The scope ``custom:schedule`` (namespace ``custom.schedule``) holds the scheduler's
fire records and is reserved: a user submit with it, or a plugin answer that maps a
user's scope onto that namespace, is ``InvalidInput("idempotency_scope")`` before
anything is written; only the scheduler's own submit path
(``IdempotencyRequest.scheduler``) uses it, and its records stay there whatever the
``qo_idempotency_namespace`` plugins answer.

Records are read defensively (``decode_record``): a record holding garbage costs only
itself. The sweep reports and skips it; a submit of its key reports it and replaces it
by compare-and-swap over the garbage (``Idempotency._repair``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any

import attrs

from . import keys, tombstones
from .errors import (
    CorruptObject,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
    TaskNotFound,
)
from .model import Task, _short, dumps, is_utf8
from .stored import check_fields, decode, is_number, is_str, matches

SCOPE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}\Z")
MAX_KEY_CHARS = 1024
DEFAULT_TTL_DAYS = 7.0

#: The scope the scheduler submits its fire times with (``qo.schedules.IDEMPOTENCY_SCOPE``).
#: Reserved: a fire's key (``{name}@{ms}#{uid}``) is predictable from the schedule
#: record, so a user submit in this scope could pre-empt a fire with its own task.
SCHEDULER_SCOPE = "custom:schedule"
#: Where the scheduler's records live: the namespace ``custom:schedule`` has always
#: mapped to by default. Kept as it is, so fire records stored before the reservation
#: stay valid (a fire in flight across an upgrade still finds its task).
SCHEDULER_NAMESPACE = "custom.schedule"
_RESERVED = f"{SCHEDULER_SCOPE} is reserved for qo's scheduler (its fire records)"

#: The fields of a stored record and what each must be; ``decode_record`` checks them.
RECORD_FIELDS = {
    "key": is_str, "scope": is_str, "namespace": is_str,
    "task_id": matches(keys.TASK_ID), "task_type": is_str, "input_hash": is_str,
    "created_at": is_number, "expires_at": is_number,
}
RECORD_REQUIRED = ("task_id", "task_type", "input_hash", "expires_at")


@attrs.frozen
class IdempotencyRequest:
    key: str
    scope: str
    ttl_days: float
    #: the scheduler's own submit (``qo/schedules.py``), the one user of SCHEDULER_SCOPE;
    #: set by qo, never from a submit option
    scheduler: bool = attrs.field(default=False, kw_only=True)


def check_request(key: Any, scope: Any, ttl_days: Any, *, scheduler: bool = False) -> IdempotencyRequest | None:
    """Validate the three idempotency arguments (all three, even without a key: a bad scope
    or TTL is a mistake either way); ``None`` when no key is given. The scheduler's scope
    is refused unless ``scheduler`` (qo's own fire path) says this is the scheduler."""
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or "\x00" in key or not is_utf8(key)):
        raise InvalidInput("idempotency_key", f"must be a non-empty string of at most {MAX_KEY_CHARS} "
                           "characters without NUL or lone surrogates")
    if not isinstance(scope, str) or not (
        scope in ("task_type", "queue") or (scope.startswith("custom:") and SCOPE_NAME.match(scope[7:]))
    ):
        raise InvalidInput("idempotency_scope", f"{_short(scope)} is not 'task_type', 'queue' or 'custom:<name>' "
                           "(name: letters, digits, _ . : -)")
    if isinstance(ttl_days, bool) or not isinstance(ttl_days, (int, float)) or not 0 < ttl_days <= 3650:
        raise InvalidInput("idempotency_ttl_days", f"{ttl_days!r} is not a number of days in (0, 3650]")
    if scope == SCHEDULER_SCOPE and not scheduler:
        raise InvalidInput("idempotency_scope", f"{_RESERVED}; choose another custom:<name>")
    if key is None:
        return None
    return IdempotencyRequest(key, scope, float(ttl_days), scheduler=scheduler)


def input_hash(input: Any) -> str:
    """Canonical hash of the input: key order and whitespace do not matter."""
    return hashlib.sha256(dumps(input)).hexdigest()


def default_namespace(scope: str, task_type: str) -> str:
    """``task_type`` -> ``type.<type>``; ``queue`` -> ``queue``; ``custom:<n>`` -> ``custom.<n>``."""
    if scope == "task_type":
        return f"type.{task_type}"
    if scope == "queue":
        return "queue"
    return "custom." + scope[len("custom:"):]


def record_key(queue: str, namespace: str, key: str) -> str:
    return keys.idem(queue, namespace, hashlib.sha256(key.encode("utf-8")).hexdigest())


def decode_record(data: bytes, key: str, *, backend: str = "") -> dict[str, Any]:
    """The record stored at ``key``; ``CorruptObject`` naming the key and why if it is
    not one this release can use (not JSON, not an object, a field missing or unusable)."""
    return check_fields(decode(data, key, backend=backend), key, RECORD_FIELDS,
                        required=RECORD_REQUIRED, backend=backend)


def salvaged_task_id(data: bytes) -> str | None:
    """The task id a corrupt record still names, if it names a usable one."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError, TypeError):
        return None
    task_id = value.get("task_id") if isinstance(value, dict) else None
    return task_id if isinstance(task_id, str) and keys.TASK_ID.match(task_id) else None


class Idempotency:
    """Submits a task at most once per (namespace, key) while the key lives."""

    def __init__(self, queue: Any):
        self.queue = queue

    def namespace(self, request: IdempotencyRequest, task_type: str) -> str:
        """The namespace of ``request``'s key: ``qo_idempotency_namespace``'s answer, else
        the default. ``InvalidInput`` for an unusable answer, or for a user's scope that a
        plugin maps onto the scheduler's namespace.

        The scheduler's own requests always live in ``SCHEDULER_NAMESPACE``, whatever
        the plugins say: a plugin that scopes every key alike (per tenant, say) would
        otherwise put fire records where a user's keys can reach them."""
        if request.scheduler:
            return SCHEDULER_NAMESPACE
        ns = self.queue.plugins.hook.qo_idempotency_namespace(
            scope=request.scope, key=request.key, task_type=task_type, queue=self.queue.name)
        ns = ns if ns is not None else default_namespace(request.scope, task_type)
        if not isinstance(ns, str) or not all(SCOPE_NAME.match(p) for p in ns.split("/")):
            raise InvalidInput("idempotency_scope", f"a plugin returned the unusable namespace {ns!r}")
        if ns == SCHEDULER_NAMESPACE:
            raise InvalidInput("idempotency_scope", f"a plugin maps {request.scope!r} to the namespace {ns!r}, "
                               f"the scheduler's: {_RESERVED}")
        return ns

    def record(self, task: Task, request: IdempotencyRequest, namespace: str) -> dict[str, Any]:
        now = self.queue.clock.now()
        return {
            "key": request.key,
            "scope": request.scope,
            "namespace": namespace,
            "task_id": task.id,
            "task_type": task.task_type,
            "input_hash": input_hash(task.input),
            "created_at": now,
            "expires_at": now + request.ttl_days * 86400,
        }

    async def submit(self, task: Task, request: IdempotencyRequest) -> Task:
        """The task for this key: ``task`` if it is the first, else the existing one."""
        store = self.queue.store
        namespace = self.namespace(request, task.task_type)
        key = record_key(self.queue.name, namespace, request.key)
        mine = self.record(task, request, namespace)
        data = dumps(mine)
        for _ in range(16):
            try:
                await store.put_marker(keys.idem_expiry(self.queue.name, mine["expires_at"], key))  # first
                await self._create(key, data, task.id)
                return await self._write_task(task)
            except PreconditionFailed:
                pass
            try:
                blob = await store.backoff.call(lambda: store.storage.get(key))
            except NotFound:
                continue  # expired and cleaned up in between: try to create again
            if tombstones.is_tombstone(blob.data):  # an expired record being deleted
                blob = await self._after_tombstone(key, blob)
                if blob is None:
                    continue  # deleted: create again
                existing = {"expires_at": float("-inf")}  # its sweeper died: taken over by CAS below
            else:
                existing = None
            try:
                if existing is None:
                    existing = decode_record(blob.data, key, backend=store.storage.name)
            except CorruptObject as exc:
                store.bad.report(exc, "replaced by this submit's record")
                try:
                    return await self._repair(key, blob.data, blob.etag, task, request, namespace)
                except PreconditionFailed:
                    continue  # somebody else replaced it first: read theirs
            if existing["expires_at"] <= self.queue.clock.now():
                try:  # expired: the key may name a new task now
                    await store.put_marker(keys.idem_expiry(self.queue.name, mine["expires_at"], key))
                    await store.backoff.call(lambda: store.storage.put(key, data, if_match=blob.etag))
                except PreconditionFailed:
                    continue
                return await self._write_task(task)
            self._check_conflict(existing, mine, request)
            try:
                return await self.queue.get(existing["task_id"])
            except TaskNotFound:
                # its producer is slow or died between its writes: write the task under the
                # recorded id; create-only, so a late producer and we make one task
                task.id = existing["task_id"]
                return await self._write_task(task)
        raise PreconditionFailed("idempotency record keeps changing", backend=store.storage.name, key=key)

    async def _after_tombstone(self, key: str, blob: Any) -> Any:
        """Wait for the young tombstone ``blob`` at ``key`` to go (its sweeper deletes it
        in its next request; a record written over it now could be deleted with it):
        None once it is gone or replaced, or the tombstone once it is old (its sweeper
        died: ours to take over by CAS). Waits at most ``tombstones.GRACE`` in all."""
        store = self.queue.store
        waited, pause = 0.0, 0.02
        while tombstones.is_young(blob.data, self.queue.clock.now()) and waited < tombstones.GRACE:
            await asyncio.sleep(pause)
            waited, pause = waited + pause, min(1.0, pause * 2)
            try:
                fresh = await store.backoff.call(lambda: store.storage.get(key))
            except NotFound:
                return None
            if fresh.etag != blob.etag:
                return None  # replaced by another producer: read it afresh
        return blob

    async def _repair(self, key: str, garbage: bytes, etag: str, task: Task, request: IdempotencyRequest,
                      namespace: str) -> Task:
        """Replace the corrupt record at ``key`` (version ``etag``) by CAS and return the
        key's task; ``PreconditionFailed`` if the record changed in between.

        The garbage has lost its answer, but a task id it still names is kept: if that
        task exists, the new record describes it (and a different input is still an
        ``IdempotencyConflict``), so repairing never makes a second task for a key whose
        task is there; if not, ``task`` is written under that id. Only a record naming no
        usable task id gets a record for ``task`` as it is.
        """
        store = self.queue.store
        salvaged = salvaged_task_id(garbage)
        found: Task | None = None
        if salvaged is not None:
            try:
                found = await self.queue.get(salvaged)
            except TaskNotFound:
                pass
        own_id = task.id
        if found is None and salvaged is not None:
            task.id = salvaged
        record = self.record(found if found is not None else task, request, namespace)
        try:
            await store.put_marker(keys.idem_expiry(self.queue.name, record["expires_at"], key))
            await store.backoff.call(lambda: store.storage.put(key, dumps(record), if_match=etag))
        except BaseException:
            task.id = own_id  # the caller's next round builds on the record it will read
            raise
        if found is None:
            return await self._write_task(task)
        self._check_conflict(record, self.record(task, request, namespace), request)
        return found

    async def _create(self, key: str, data: bytes, task_id: str) -> None:
        """Create-only. Only after a failure whose outcome is unknown does a refusal need
        a read: the record may be our own, landed with its response lost."""
        store = self.queue.store
        uncertain = False
        for attempt in range(1, store.backoff.attempts + 1):
            try:
                await store.storage.put(key, data, if_none_match=True)
                return
            except StorageUnavailable as exc:
                uncertain = True
                if attempt == store.backoff.attempts:
                    raise
                await store.backoff.pause(attempt, exc)
            except PreconditionFailed:
                if not uncertain:
                    raise
                try:
                    blob = await store.backoff.call(lambda: store.storage.get(key))
                except NotFound:
                    raise PreconditionFailed("record vanished", backend=store.storage.name, key=key) from None
                try:
                    ours = decode_record(blob.data, key, backend=store.storage.name)["task_id"] == task_id
                except CorruptObject:
                    ours = False  # not what we wrote: the caller reads it again and deals with it
                if not ours:
                    raise
                return

    async def _write_task(self, task: Task) -> Task:
        try:
            await self.queue._write_new(task)
        except PreconditionFailed:  # somebody wrote it under this id first
            return await self.queue.get(task.id)
        return task

    def _check_conflict(self, existing: dict[str, Any], mine: dict[str, Any], request: IdempotencyRequest) -> None:
        if existing.get("task_type") != mine["task_type"]:
            raise IdempotencyConflict(
                f"idempotency key {request.key!r} ({request.scope}) names task {existing.get('task_id')} "
                f"of type {existing.get('task_type')!r}, not {mine['task_type']!r}")
        if existing.get("input_hash") != mine["input_hash"]:
            raise IdempotencyConflict(
                f"idempotency key {request.key!r} ({request.scope}) names task {existing.get('task_id')} "
                "with a different input")


async def sweep_expired(queue: Any, cursor: str | None, *, limit: int = 100) -> str | None:
    """Delete up to ``limit`` expired records after ``cursor``; returns the next cursor
    (``None`` once the end is reached, so the next sweep starts over). A record that
    cannot be read is reported (``queue.store.bad``: logged once, counted) and skipped:
    it is not judged expired, and the others are swept."""
    store = queue.store
    entries = await store.list(keys.idem_prefix(queue.name), start_after=cursor, limit=limit)
    now = queue.clock.now()
    for entry in entries:
        try:
            blob = await store.backoff.call(lambda: store.storage.get(entry.key))
        except NotFound:
            continue
        if tombstones.is_tombstone(blob.data):  # another sweep's: cleared only if its sweeper died
            await tombstones.clear_old(store, entry.key, blob.data, blob.etag, now)
            continue
        try:
            expires_at = decode_record(blob.data, entry.key, backend=store.storage.name)["expires_at"]
        except CorruptObject as exc:
            store.bad.report(exc)
            continue
        if expires_at <= now:  # only the version judged expired: a fresh replacement stays
            await tombstones.delete_unchanged(store, entry.key, blob.etag, now, "expired")
    return entries[-1].key if len(entries) >= limit else None


async def sweep_expiry_index(queue: Any, *, limit: int = 1000) -> int:
    """Delete the records whose expiry markers (``idem-exp/``, in expiry order) are due:
    the cost is per expired record (a GET, a conditional DELETE and a share of a LIST and
    a DeleteObjects), whatever the number of live records. Returns how many markers were
    handled: ``limit`` means more are due (sweep again soon).

    A marker is written before its record (a marker without a record is deleted here);
    a record replaced with a later expiry has a later marker of its own, so an earlier
    marker whose record is not expired yet is simply deleted."""
    store = queue.store
    now = queue.clock.now()
    entries = await store.list(keys.idem_expiry_prefix(queue.name), limit=limit)
    done: list[str] = []
    sem = asyncio.Semaphore(16)

    async def one(entry: Any) -> bool:
        parsed = keys.parse_idem_expiry(queue.name, entry.key)
        if parsed is None:
            return True  # not ours to judge: leave it (doctor --scan names it)
        expires_at, record = parsed
        if expires_at > now:
            return False
        async with sem:
            try:
                blob = await store.backoff.call(lambda: store.storage.get(record))
            except NotFound:
                done.append(entry.key)
                return True
            if tombstones.is_tombstone(blob.data):  # another sweep's: cleared only if its sweeper died
                if tombstones.is_young(blob.data, now):
                    return False  # not done: looked at again by the next sweep
                await tombstones.clear_old(store, record, blob.data, blob.etag, now)
                done.append(entry.key)
                return True
            try:
                stored_expiry = decode_record(blob.data, record, backend=store.storage.name)["expires_at"]
            except CorruptObject as exc:
                store.bad.report(exc)
                done.append(entry.key)  # a submit of its key repairs it (and marks it again)
                return True
            if stored_expiry <= now:  # only the version judged expired: a fresh replacement stays
                await tombstones.delete_unchanged(store, record, blob.etag, now, "expired")
            done.append(entry.key)
            return True

    results = await asyncio.gather(*(one(e) for e in entries))
    await store.delete_markers(done)
    handled = 0
    for r in results:
        if not r:
            break  # the first marker not yet due: the rest are later
        handled += 1
    return handled