"""Packs: up to 256 tasks submitted in bulk, stored in one object (docs/architecture.md §5k).

A pack is ``{q}/packs/{pack_id}.json``: the fields its tasks share (``template``) and,
per task, only what differs (``entries``). A task in a pack has an ordinary task id
(the pack id and its index), so ``queue.get`` finds it with one GET of its pack. The
pack is the single source of truth for its tasks, except an entry that ``moved`` out:
it left the pack as an ordinary ``tasks/{id}.json`` (a retry) and keeps a snapshot of
the state it left with, in case the process that moved it died before writing it.

This module is the object and its reads and writes; the worker's side (claim, run,
coalesced outcomes) is ``qo/pack_runner.py``, recovery is in ``qo/leases.py``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
from typing import Any, Callable, ClassVar

import attrs

from . import keys, stored
from .errors import CorruptObject, NotFound, PreconditionFailed, StorageUnavailable, TaskNotFound
from .model import PENDING, RUNNING, SCHEMA_VERSION, StoredRecord, Task, dumps, new_rev, record_fields, record_json

#: entries in one pack, at most (an index is 3 hex digits: 4096 would fit)
PACK_SIZE = 256
#: a pack's encoded size when it is written, at most (inputs are at most 64 KiB inline)
PACK_BYTES = 1024 * 1024
#: a handler's output over this many bytes is stored apart from its pack (§5i): the
#: pack is rewritten by every flush, so it stays small
PACK_OUTPUT_INLINE = 16 * 1024
MOVED = "moved"
#: a pack's own status: pending (claimable), running (a worker holds its lease), done
PACK_STATUSES = ("pending", "running", "done")
#: task fields every entry carries itself, never from the template
_OWN = ("id", "rev", "schema")


#: encoded entries of a pack by the entry's identity (``Pack.to_json``)
Fragments = dict[int, tuple[dict[str, Any], bytes]]
#: stands for the entries in the encoded pack until they are spliced in (no stored
#: value can encode to it: it is drawn at random per process)
_ENTRIES_SLOT = f"qo-entries-{os.urandom(12).hex()}"
_ENTRIES_SLOT_JSON = dumps(_ENTRIES_SLOT)


def entry_fingerprint(entry: dict[str, Any]) -> str:
    """A short digest of one entry as stored: a per-entry version for compare-and-swap."""
    return hashlib.sha256(dumps(entry)).hexdigest()[:16]


_SKIP = object()  # a task field an entry never holds (put adds rev itself)
_ROWS: dict[int, tuple[dict[str, Any], tuple[Any, ...]]] = {}


def _template_row(template: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    """The template's value of each task field, in field order (``NOTHING`` where it has
    none, ``_SKIP`` for the fields ``put`` leaves out), looked up once per template
    object: a pack's template is never changed in place."""
    hit = _ROWS.get(id(template))
    if hit is not None and hit[0] is template:  # the same object, kept alive by the cache
        return hit[1]
    if len(_ROWS) >= 64:
        _ROWS.clear()
    row = tuple(_SKIP if n in _OWN or n == "extra" else template.get(n, attrs.NOTHING) for n in names)
    _ROWS[id(template)] = (template, row)
    return row


@attrs.define
class Pack(StoredRecord):
    """Tasks of one type and priority, written together by ``submit_many``."""

    id: str
    task_type: str
    priority: int
    status: str = "pending"
    available_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    #: the worker holding the pack: {"worker_id", "lease_id", "claimed_at"}; None when pending
    lease: dict[str, Any] | None = None
    claims: int = 0
    template: dict[str, Any] = attrs.field(factory=dict)
    entries: list[dict[str, Any]] = attrs.field(factory=list)
    kind: str = "pack"
    #: set when a purge has judged this version deletable (qo/tombstones.py)
    purging_at: float | None = None
    rev: str = ""
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = attrs.field(factory=dict, repr=False)

    FIELD_CHECKS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "id": stored.matches(keys.PACK_ID),
        "task_type": stored.matches(keys.TASK_TYPE),
        "priority": lambda v: stored.is_int(v, 0, 255),
        "status": stored.one_of(*PACK_STATUSES),
        "available_at": stored.is_number,
        "created_at": stored.is_number,
        "updated_at": stored.is_number,
        "lease": stored.optional(lambda v: isinstance(v, dict) and isinstance(v.get("lease_id"), str)
                                 and isinstance(v.get("worker_id"), str)),
        "claims": stored.is_int,
        "template": stored.is_dict,
        "entries": lambda v: isinstance(v, list) and 0 < len(v) <= 4096 and all(isinstance(e, dict) for e in v),
        "kind": stored.one_of("pack"),
        "purging_at": stored.optional(stored.is_number),
        "rev": stored.is_str,
        "schema": stored.is_int,
    }
    REQUIRED: ClassVar[tuple[str, ...]] = ("id", "task_type", "priority", "status", "template", "entries")

    @classmethod
    def build(cls, pack_id: str, tasks: list[Task], now: float) -> "Pack":
        """A new pending pack of ``tasks`` (already given their entry ids)."""
        first = tasks[0].to_dict()
        template = {k: v for k, v in first.items() if k not in _OWN and k != "input"}
        pack = cls(id=pack_id, task_type=tasks[0].task_type, priority=tasks[0].priority,
                   available_at=now, created_at=now, updated_at=now, template=template,
                   entries=[{} for _ in tasks])
        for i, task in enumerate(tasks):
            pack.put(i, task)
        return pack

    def to_json(self, fragments: Fragments | None = None) -> bytes:
        """The stored form. ``fragments``: the encoded entries of this pack's last write,
        by identity, for a pack changed only as ``fork`` allows (entries replaced whole,
        never changed in place): an entry that is the same object is not encoded again
        (a holder's flush rewrites a whole pack to change a few entries). Refreshed to
        the current entries. The bytes are those of ``record_json(self.to_dict())`` (the
        fast codec of records; an entry's fingerprint stays on ``dumps``)."""
        if fragments is None:
            return record_json(self.to_dict())
        d = self.to_dict()
        entries, d["entries"] = d["entries"], _ENTRIES_SLOT
        parts: list[bytes] = []
        fresh: Fragments = {}
        for entry in entries:
            hit = fragments.get(id(entry))
            part = hit[1] if hit is not None and hit[0] is entry else record_json(entry)
            fresh[id(entry)] = (entry, part)  # the entry is kept: its id stays its own
            parts.append(part)
        fragments.clear()
        fragments.update(fresh)
        return record_json(d).replace(_ENTRIES_SLOT_JSON, b"[" + b",".join(parts) + b"]", 1)

    @classmethod
    def from_json(cls, data: bytes, key: str = "?", *, backend: str = "") -> "Pack":
        pack = super().from_json(data, key, backend=backend)
        if key != "?" and not key.endswith(f"/packs/{pack.id}.json"):
            raise CorruptObject(key, f"holds pack {pack.id}, not the one its key names", backend=backend)
        return pack

    def key(self, queue: str) -> str:
        return keys.pack(queue, self.id)

    def marker_key(self, queue: str) -> str:
        """The pack's ready marker: its id (21 hex characters) where a task's id would be."""
        return keys.ready(queue, self.priority, self.available_at, self.id, self.task_type)

    def task_id(self, index: int) -> str:
        return keys.entry_id(self.id, index)

    def status_of(self, index: int) -> str:
        return self.entries[index].get("status", self.template.get("status", PENDING))

    def task(self, index: int, key: str = "?", *, backend: str = "", template_checked: bool = False) -> Task:
        """Entry ``index`` as a task (``CorruptObject`` if the entry is unusable). A moved
        entry gives the snapshot of the state it left the pack with. ``template_checked``:
        the caller has just checked the template (``check_template``), so only the
        fields the entry sets are checked here (a loop over many entries checks the
        shared fields once)."""
        entry = self.entries[index]
        if entry.get("status") == MOVED:
            snapshot = entry.get("task")
            if not isinstance(snapshot, dict):
                raise CorruptObject(key, f"entry {index} moved out without its snapshot", backend=backend)
            d = {**snapshot, "id": self.task_id(index)}
        else:
            d = {**self.template, **entry, "id": self.task_id(index)}
            d.setdefault("rev", "")
            if template_checked:
                spec = Task.FIELD_CHECKS
                if all(name in d for name in Task.REQUIRED) and spec["id"](d["id"]) and spec["rev"](d["rev"]) \
                        and all(spec[k](v) for k, v in entry.items() if k in spec):
                    return Task.from_dict(d)
                # something is wrong: the full check names the first bad field, as always
        stored.check_fields(d, key, Task.FIELD_CHECKS, required=Task.REQUIRED, backend=backend)
        return Task.from_dict(d)

    def check_template(self) -> bool:
        """The fields every entry shares are usable (then ``task(..., template_checked=True)``
        checks only each entry's own)."""
        spec = Task.FIELD_CHECKS
        return all(spec[k](v) for k, v in self.template.items() if k in spec)

    def put(self, index: int, task: Task) -> None:
        """Store ``task`` as entry ``index``: only what differs from the template (in
        ``to_dict``'s order, without ``id`` and ``schema``), then its own ``rev``."""
        names, values, _ = record_fields(Task)
        template = self.template
        entry = {k: v for k, v in task.extra.items() if template.get(k, attrs.NOTHING) != v} if task.extra else {}
        for name, value, shared in zip(names, values(task), _template_row(template, names)):
            if shared is not _SKIP and value != shared:  # a field absent from the template is NOTHING
                entry[name] = value
        entry["rev"] = task.rev  # always the entry's own
        self.entries[index] = entry

    def move_out(self, index: int, task: Task) -> None:
        """Entry ``index`` leaves the pack as ``task`` (pending again: a retry); its
        snapshot stays, in case ``tasks/{id}.json`` was never written."""
        d = task.to_dict()
        d.pop("id", None)
        self.entries[index] = {"status": MOVED, "task": d}

    def settle_status(self, now: float) -> bool:
        """The pack's own status from its entries': running while its holder has entries
        running, pending while some are pending, else done. True when the pack became
        claimable again (a holder let go of pending entries): it is due now, never at its
        previous due time, and the caller owes it a new ready marker."""
        default = self.template.get("status", PENDING)  # as status_of, for every entry at once
        statuses = {e.get("status", default) for e in self.entries}
        self.updated_at = now
        if self.status == "running" and self.lease is not None and RUNNING in statuses:
            return False
        if PENDING in statuses:
            requeued = self.status != "pending"
            if requeued:
                self.available_at = max(now, self.available_at + 0.001)
            self.status, self.lease = "pending", None
            return requeued
        self.status, self.lease = "done", None
        return False


def _same_creation(stored: Pack, ours: Pack) -> bool:
    """The stored pack is the one we created: the creation time (our clock, to the
    microsecond) and every task's input match. Another producer that drew the same id
    made its pack at its own time."""
    if stored.created_at != ours.created_at or len(stored.entries) != len(ours.entries):
        return False
    try:
        return all(stored.task(i).input == ours.task(i).input for i in range(len(ours.entries)))
    except CorruptObject:  # changed since into something unusable: not provably ours
        return False


def split_etag(etag: str) -> tuple[str, str]:
    """(pack etag, entry fingerprint) of an entry's etag (see ``entry_etag``)."""
    pack_etag, sep, fingerprint = etag.rpartition("#entry:")
    if not sep:
        raise PreconditionFailed("not the version of a task in a pack")
    return pack_etag, fingerprint


def entry_etag(pack_etag: str, entry: dict[str, Any]) -> str:
    """The version of one entry: its pack's etag and the entry's fingerprint. A CAS with
    it succeeds while the entry is unchanged, whatever happened to its siblings."""
    return f"{pack_etag}#entry:{entry_fingerprint(entry)}"


class PackStore:
    """Reads and compare-and-swap writes of packs, for a ``qo.store.TaskStore``."""

    def __init__(self, store: Any):
        self.store = store
        #: pack id -> [etag, the bytes stored, those bytes decoded once needed] as last
        #: read or written here: a CAS over a version we hold needs no read first
        #: (bounded; a stale entry only costs a refused CAS). The bytes are what storage
        #: holds, so nothing a caller does to its pack afterwards can change them: keeping
        #: them costs no copy per read or write (most are never used: decoded on first use)
        self._known: dict[str, list[Any]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _remember(self, pack_id: str, etag: str, data: bytes) -> None:
        self._known.pop(pack_id, None)
        self._known[pack_id] = [etag, data, None]
        if len(self._known) > 64:
            self._known.pop(next(iter(self._known)))

    def _recall(self, pack_id: str) -> tuple[str, Pack] | None:
        """The etag and pack this process last read or wrote (the caller's own copy)."""
        known = self._known.get(pack_id)
        if known is None:
            return None
        if known[2] is None:
            try:
                known[2] = Pack.from_json(known[1], self.key(pack_id), backend=self.storage.name)
            except CorruptObject:  # not a pack this release reads back: read it from storage
                self._known.pop(pack_id, None)
                return None
        return known[0], clone(known[2])

    @property
    def storage(self) -> Any:
        return self.store.storage

    def key(self, pack_id: str) -> str:
        return keys.pack(self.store.queue, pack_id)

    async def load(self, pack_id: str, *, purging: bool = False) -> tuple[Pack, str]:
        """The pack and its etag; ``TaskNotFound`` if there is none (or a purge is
        deleting it, unless ``purging``), ``CorruptObject`` (reported once) if it is unusable."""
        key = self.key(pack_id)
        try:
            blob = await self.store.backoff.call(lambda: self.storage.get(key))
        except NotFound:
            raise TaskNotFound(pack_id) from None
        try:
            pack = Pack.from_json(blob.data, key, backend=self.storage.name)
        except CorruptObject as exc:
            self.store.bad.report(exc)
            raise
        if pack.purging_at is not None and not purging:
            raise TaskNotFound(pack_id, "a purge is deleting it")
        self._remember(pack.id, blob.etag, blob.data)
        return pack, blob.etag

    async def tombstone(self, pack: Pack, etag: str, now: float) -> bool:
        """Mark the version ``etag`` of ``pack`` as being deleted (qo/tombstones.py): no
        writer can change it or its tasks any more. False if it changed since."""
        pack.purging_at = now
        try:
            await self.replace(pack, etag)
        except (PreconditionFailed, TaskNotFound):
            return False
        return True

    async def create(self, pack: Pack) -> str:
        """Create-only write of a new pack (a lost response that landed is recognised)."""
        return await self._write(pack, None)

    async def replace(self, pack: Pack, etag: str, *, fragments: Fragments | None = None) -> str:
        """CAS ``pack`` over ``etag``; ``PreconditionFailed`` if it changed. ``fragments``:
        see ``Pack.to_json`` (a holder writing the packs it ``fork``-s)."""
        return await self._write(pack, etag, fragments)

    async def _write(self, pack: Pack, etag: str | None, fragments: Fragments | None = None) -> str:
        pack.rev = new_rev()
        data = pack.to_json(fragments)
        etag = await self._put(pack, etag, data)
        self._remember(pack.id, etag, data)
        return etag

    async def _put(self, pack: Pack, etag: str | None, data: bytes) -> str:
        key = self.key(pack.id)
        backoff = self.store.backoff
        for attempt in range(1, backoff.attempts + 1):
            try:
                if etag is None:
                    return await self.storage.put(key, data, if_none_match=True)
                return await self.storage.put(key, data, if_match=etag)
            except StorageUnavailable as failure:
                if attempt == backoff.attempts:
                    raise
                await backoff.pause(attempt, failure)
                try:
                    blob = await backoff.call(lambda: self.storage.get(key))
                except NotFound:
                    if etag is None:
                        continue  # did not land: create again
                    raise PreconditionFailed("pack vanished", backend=self.storage.name, key=key) from None
                if etag is not None and blob.etag == etag:
                    continue  # did not land: try again
                try:
                    stored = Pack.from_json(blob.data, key, backend=self.storage.name)
                except CorruptObject:
                    landed = False
                else:  # ours; or, for a create, ours changed since (a worker claimed it already)
                    landed = stored.rev == pack.rev or (etag is None and _same_creation(stored, pack))
                if landed:
                    return blob.etag  # landed; only the response was lost
                raise PreconditionFailed("changed by another writer", backend=self.storage.name, key=key) from None
        raise AssertionError("unreachable")

    # -- one task of a pack, as the rest of qo sees a task --------------------------

    async def load_task(self, task_id: str) -> tuple[Task, str]:
        """Task ``task_id`` of its pack, with an entry etag (``entry_etag``); a task that
        moved out is read from its own object (written from the snapshot if missing)."""
        pack_id, index = keys.pack_of(task_id)  # type: ignore[misc]
        try:
            pack, etag = await self.load(pack_id)
        except TaskNotFound:  # an id shaped like a pack's that is a task of its own
            return await self.store.load_object(task_id)
        if index >= len(pack.entries):
            raise TaskNotFound(task_id)
        key = self.key(pack_id)
        if pack.status_of(index) == MOVED:
            return await self._moved(pack, index, key)
        try:
            task = pack.task(index, key, backend=self.storage.name)
        except CorruptObject as exc:
            self.store.bad.report(exc)
            raise
        return task, entry_etag(etag, pack.entries[index])

    async def _moved(self, pack: Pack, index: int, key: str) -> tuple[Task, str]:
        try:
            return await self.store.load_object(pack.task_id(index))
        except TaskNotFound:
            pass
        snapshot = pack.task(index, key, backend=self.storage.name)
        return snapshot, await self.write_moved(snapshot)

    async def write_moved(self, task: Task) -> str:
        """Write the object of a task that moved out of its pack (create-only: whoever
        wrote it first wrote the same snapshot); its etag."""
        task_key = keys.task(self.store.queue, task.id)
        try:
            return await self.store.backoff.call(lambda: self.storage.put(task_key, task.to_json(),
                                                                          if_none_match=True))
        except PreconditionFailed:
            blob = await self.store.backoff.call(lambda: self.storage.get(task_key))
            return blob.etag

    @staticmethod
    def _leaves(pack: Pack, index: int, task: Task) -> bool:
        """A pending task leaves its pack when it becomes pending again (a retry) or its
        due time or priority change: the pack's one marker no longer speaks for it. A
        pending task that stays as it was (a dependent marks it, a cancel is asked) stays."""
        if pack.status_of(index) != PENDING:
            return True
        before = {**pack.template, **pack.entries[index]}
        return before.get("available_at") != task.available_at or before.get("priority") != task.priority

    async def replace_task(self, task: Task, etag: str) -> str:
        """CAS one task of a pack over its entry etag: the pack is rewritten with only this
        entry changed, as long as this entry is as ``etag`` saw it (its siblings may have
        changed: re-read and try again). A task going back to ``pending`` (a retry) moves
        out (``_leaves``): the pack keeps its snapshot, then ``tasks/{id}.json`` is
        written; the etag returned is then that object's."""
        pack_id = keys.pack_of(task.id)[0]  # type: ignore[index]
        lock = self._locks.get(pack_id)
        if lock is None:
            lock = self._locks[pack_id] = asyncio.Lock()
            for old in [k for k, v in self._locks.items() if not v.locked()][:-64]:
                del self._locks[old]  # the oldest idle ones go (a waiter holds its own reference)
        async with lock:  # this process's writes to one pack go one after another
            return await self._replace_task(task, etag)

    async def _replace_task(self, task: Task, etag: str) -> str:
        pack_id, index = keys.pack_of(task.id)  # type: ignore[misc]
        pack_etag, fingerprint = split_etag(etag)
        # the version this process wrote or read last: when this entry is as the caller
        # saw it there, a CAS over it needs no read first (its siblings may have changed)
        known = self._recall(pack_id)
        pack: Pack | None = None
        if known is not None and index < len(known[1].entries) \
                and entry_fingerprint(known[1].entries[index]) == fingerprint:
            pack_etag, pack = known
        for _ in range(50):
            if pack is None:
                pack, pack_etag = await self.load(pack_id)
            if pack.purging_at is not None:  # a version this process tombstoned itself
                raise TaskNotFound(task.id, "a purge is deleting it")
            if index >= len(pack.entries) or entry_fingerprint(pack.entries[index]) != fingerprint:
                raise PreconditionFailed("changed by another writer", backend=self.storage.name,
                                         key=self.key(pack_id))
            now = task.updated_at
            task.rev = new_rev()
            moving = task.status == PENDING and self._leaves(pack, index, task)
            if moving:
                pack.move_out(index, task)
            else:
                pack.put(index, task)
            was, marker = pack.status, pack.marker_key(self.store.queue)
            requeued = pack.settle_status(max(now, pack.updated_at))
            try:
                new_etag = await self.replace(pack, pack_etag)
            except PreconditionFailed:
                pack = None  # a sibling changed (or this entry): read again
                continue
            if requeued:
                await self.store.put_marker(pack.marker_key(self.store.queue))
            elif was == "pending" and pack.status == "done":  # its last pending task ended
                await self.store.delete_markers([marker])
            if moving:
                return await self.write_moved(task)
            return entry_etag(new_etag, pack.entries[index])
        raise PreconditionFailed("the pack kept changing", backend=self.storage.name, key=self.key(pack_id))


#: types a JSON tree's leaves have: shared between copies, as ``copy.deepcopy`` does
_ATOMIC = frozenset({str, int, float, bool, type(None)})


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON tree (dicts, lists and atomic leaves), several times faster
    than ``copy.deepcopy``; anything else in it is copied by ``copy.deepcopy``. (Unlike
    ``deepcopy`` it does not keep two references to one dict or list as one: a pack read
    from JSON never has any.)"""
    t = type(value)
    if t is dict:
        return {k: v if type(v) in _ATOMIC else copy_json(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) in _ATOMIC else copy_json(v) for v in value]
    if t in _ATOMIC:
        return value
    return copy.deepcopy(value)


def clone(pack: Pack) -> Pack:
    """A deep copy to change and write (the copy in hand stays as stored)."""
    return Pack(**{name: copy_json(getattr(pack, name)) for name in _PACK_FIELDS})


_PACK_FIELDS = tuple(f.name for f in attrs.fields(Pack))


def fork(pack: Pack) -> Pack:
    """A copy of ``pack`` to change only as the worker changes a pack it holds: entries
    replaced whole (``put``, ``move_out``) and the pack's own fields set
    (``settle_status``, ``lease``). Only the list of entries is new: the entries, the
    template and every value in them are shared with ``pack``, so neither copy may
    change them in place (``clone`` makes a copy that may)."""
    return attrs.evolve(pack, entries=list(pack.entries))
