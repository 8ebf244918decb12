"""Leases: a worker's record (``workers/{id}.json``) is the lease of all its tasks.

One heartbeat write renews every lease a worker holds. The record names each task
*before* the worker tries to claim it, so whoever finds the record stale can find
every task the worker may have been running, without scanning all tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from typing import Any

import attrs

from . import keys, stored, tombstones
from .errors import CorruptObject, NotFound, PreconditionFailed, QoError, StorageUnavailable, TaskNotFound
from .model import PENDING, RUNNING, _short, dumps
from .packs import clone
from .store import TaskStore
from .transitions import abandoned, finish

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host.lstrip('-_.') or 'host'}-{os.getpid()}-{os.urandom(3).hex()}"


#: the worker counters its record carries
COUNTED = ("claimed", "completed", "failed", "retried", "expired", "recovered")


class LeaseBook:
    """This worker's record: heartbeat time and the leases it holds or is about to take."""

    def __init__(self, store: TaskStore, worker_id: str, clock: Any, lease_ttl: float):
        self.store = store
        self.worker_id = worker_id
        self.clock = clock
        self.lease_ttl = lease_ttl
        self.key = keys.worker(store.queue, worker_id)
        self.leases: dict[str, dict[str, str]] = {}  # task id -> {"lease": id, "type": task type}
        self.etag: str | None = None
        self.written_at = 0.0
        self.evictions = 0
        self.dirty = False
        self._lock = asyncio.Lock()
        self.started_at = clock.now()
        self._held = False  # the last record written named tasks
        #: the worker's counters, shown by ``queue.stats()`` (as of the last write)
        self.counts: dict[str, int] = {}
        #: the queue's request counts (qo.meter.RequestRates), carried as ``requests`` and
        #: ``requests_per_minute`` (none: the record carries neither)
        self.requests: Any = None
        #: task id -> "request" or "terminate": cancels a ``queue.cancel`` wrote into our
        #: record (``request_cancel``), learned when our next write found the record changed
        self.cancels: dict[str, str] = {}
        #: how many handlers run now (the worker sets it): the record's ``running``, which
        #: ``queue.stats()`` shows; the leases also name candidates about to be claimed
        self.running: Any = None
        self._rev: str | None = None  # the rev of our last stored write

    def record(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "heartbeat_at": self.clock.now(),
            "lease_ttl": self.lease_ttl,
            "leases": self.leases,
            **({"running": self.running()} if self.running is not None else {}),
            "started_at": self.started_at,
            "counts": {k: self.counts.get(k, 0) for k in COUNTED},
            **self._requests(),
        }

    def _requests(self) -> dict[str, Any]:
        if self.requests is None:
            return {}
        since, per_minute = self.requests.sample()
        return {"requests": since, "requests_per_minute": per_minute}

    async def announce(self, entries: dict[str, dict[str, str]]) -> None:
        """Name tasks we are about to claim; returns only once the record is stored."""
        self.leases.update(entries)
        await self.write()

    def release(self, task_id: str) -> None:
        """Forget a task whose final state (and marker) is stored; written lazily."""
        self.cancels.pop(task_id, None)
        if self.leases.pop(task_id, None) is not None:
            self.dirty = True

    async def write(self) -> None:
        """Store the record: CAS over our last version, or create it if we have none.

        Writes are serialised (heartbeat and announce may race), and each builds its
        record inside the lock, so the last write stored is the newest state. If the
        CAS fails, recovery took our record (we were presumed dead): our old leases are
        void, their tasks requeued; we start a fresh record.
        """
        async with self._lock:
            await self._write()

    async def _write(self) -> None:
        rev = os.urandom(8).hex()  # tells our own landed write from somebody else's
        data = dumps({**self.record(), "rev": rev})
        holding = bool(self.leases)
        now = self.clock.now()
        self.dirty = False
        if self.etag is not None:
            try:
                self.etag = await self._put(data, rev, if_match=self.etag)
                self.written_at, self._held, self._rev = now, holding, rev
                return
            except PreconditionFailed:
                changed = await self._cancel_requests()
                if changed is not None:  # a canceller added requests to our record: keep going
                    self.etag = await self._put(data, rev, if_match=changed)
                    self.written_at, self._held, self._rev = now, holding, rev
                    return
                self.evictions += 1
                # only a record that named tasks matters: an empty one going stale (an idle
                # worker writes none) and being cleared by a sweep took nothing from us
                log.log(logging.WARNING if self._held else logging.DEBUG,
                        "worker %s: record was taken over by recovery", self.worker_id)
        try:
            self.etag = await self._put(data, rev, if_none_match=True)
        except PreconditionFailed:  # a stale copy of ours is there: take it over by CAS
            blob = await self.store.backoff.call(lambda: self.store.storage.get(self.key))
            if tombstones.is_young(blob.data, now):
                # a sweep presumed us dead and is deleting our record: a record written
                # over its tombstone now could be deleted with it (qo/tombstones.py).
                # Nothing is claimed without a stored record: the next write tries again
                self.dirty = True
                raise StorageUnavailable("worker record is being deleted by a sweep; written again shortly",
                                         backend=self.store.storage.name, key=self.key)
            self.etag = await self._put(data, rev, if_match=blob.etag)
        self.written_at, self._held, self._rev = now, holding, rev

    async def _cancel_requests(self) -> str | None:
        """After our CAS was refused: if the stored record is still our last write plus
        cancel requests (``request_cancel``), learn them and return its etag; None when
        it is gone or someone else's (recovery took it)."""
        try:
            blob = await self.store.backoff.call(lambda: self.store.storage.get(self.key))
            stored_record = stored.decode(blob.data, self.key)
        except (NotFound, CorruptObject):
            return None
        cancels = stored_record.get("cancel")
        if self._rev is None or stored_record.get("rev") != self._rev or not isinstance(cancels, dict):
            return None
        for task_id, mode in cancels.items():
            pack = keys.pack_of(task_id) if isinstance(task_id, str) else None
            if isinstance(task_id, str) and (task_id in self.leases or (pack is not None and pack[0] in self.leases)):
                self.cancels[task_id] = "terminate" if mode == "terminate" else "request"
        return blob.etag

    async def _put(self, data: bytes, rev: str, **condition: Any) -> str:
        """A conditional write of our record. A refusal after a failure whose outcome
        was unknown is checked against the stored record: our own landed write (its
        response lost) is a success, not an eviction."""
        uncertain = False
        for attempt in range(1, self.store.backoff.attempts + 1):
            try:
                return await self.store.storage.put(self.key, data, **condition)
            except StorageUnavailable as exc:
                uncertain = True
                if attempt == self.store.backoff.attempts:
                    raise
                await self.store.backoff.pause(attempt, exc)
            except PreconditionFailed:
                if uncertain:
                    try:
                        blob = await self.store.backoff.call(lambda: self.store.storage.get(self.key))
                    except NotFound:
                        raise PreconditionFailed("record vanished", backend=self.store.storage.name,
                                                 key=self.key) from None
                    try:
                        landed = stored.decode(blob.data, self.key).get("rev") == rev
                    except CorruptObject:
                        landed = False  # garbage over our record is not our write
                    if landed:
                        return blob.etag
                raise
        raise AssertionError("unreachable")

    def due(self, interval: float) -> bool:
        return self.clock.now() - self.written_at >= interval

    async def remove(self) -> None:
        """Delete our record on a clean exit. Unconditional: only we write this key, and
        a write cancelled mid-flight may have landed without telling us its etag."""
        if self.etag is None:
            return
        async with self._lock:
            await self.store.backoff.call(lambda: self.store.storage.delete(self.key))
            self.etag = None


_LEASE_CHECKS = {"lease": stored.is_str, "type": stored.is_str}
_RECORD_CHECKS = {
    "worker_id": stored.matches(keys.WORKER_ID),
    "heartbeat_at": stored.is_number,
    "lease_ttl": stored.is_positive,
    "leases": stored.is_dict,
}

def parse_record(data: bytes, key: str, *, backend: str = "") -> dict[str, Any]:
    """A worker record as stored at ``key``, checked; ``CorruptObject`` if unusable.
    A record names tasks by id with their lease id and type: a task id that is not
    one, or a lease that is not ``{"lease": str, "type": str}``, makes it unusable."""
    record = stored.check_fields(stored.decode(data, key, backend=backend), key, _RECORD_CHECKS,
                                 required=tuple(_RECORD_CHECKS), backend=backend)
    for task_id, lease in record["leases"].items():
        if not (keys.TASK_ID.match(task_id) or keys.PACK_ID.match(task_id)) or not isinstance(lease, dict):
            raise CorruptObject(key, f"lease {_short(task_id)} is not a task id with its lease", backend=backend)
        stored.check_fields(lease, key, _LEASE_CHECKS, required=("lease",), backend=backend)
    return record


@attrs.frozen
class SweepReport:
    workers: int  # records seen (alive or not)
    alive: dict[str, dict[str, Any]]  # worker id -> record, for those heartbeating
    recovered: list[str]  # task ids requeued or dead-lettered


async def sweep(store: TaskStore, clock: Any, *, self_id: str, max_records: int = 20,
                emit: Any = None, on_end: Any = None) -> SweepReport:
    """Find workers whose heartbeat is older than their lease and recover their tasks.

    Bounded: reads at most ``max_records`` records (chosen at random when there are
    more), so the cost per sweep does not grow with the number of workers.
    """
    entries = await store.list(keys.workers_prefix(store.queue), limit=1000)
    others = [e for e in entries if not e.key.endswith(f"/{self_id}.json")
              and keys.is_direct_child(e.key, keys.workers_prefix(store.queue))
              and not store.bad.known(e.key, e.etag)]  # the same bad version: reported already
    if len(others) > max_records:
        others = random.sample(others, max_records)
    alive: dict[str, dict[str, Any]] = {}
    recovered: list[str] = []
    now = clock.now()
    for entry in others:
        try:
            blob = await store.backoff.call(lambda: store.storage.get(entry.key))
            if tombstones.is_tombstone(blob.data):  # another sweep's: cleared only if its sweeper died
                await tombstones.clear_old(store, entry.key, blob.data, blob.etag, now)
                continue
            record = parse_record(blob.data, entry.key, backend=store.storage.name)
        except NotFound:
            continue
        except CorruptObject as exc:
            store.bad.report(exc, etag=blob.etag)
            continue
        if now <= record["heartbeat_at"] + record["lease_ttl"]:
            alive[record["worker_id"]] = record
            continue
        recovered += await recover_record(store, clock, record, emit=emit, on_end=on_end)
        # only the version we judged: a worker that came back keeps its record
        await tombstones.delete_unchanged(store, entry.key, blob.etag, now, "worker presumed dead")
    return SweepReport(len(entries), alive, recovered)


async def recover_record(store: TaskStore, clock: Any, record: dict[str, Any], *, emit: Any = None,
                         on_end: Any = None) -> list[str]:
    """Requeue (or dead-letter) every task a dead worker held; re-mark its pending ones."""
    worker_id = record.get("worker_id")
    out: list[str] = []
    for task_id, lease in (record.get("leases") or {}).items():
        if keys.PACK_ID.match(task_id):
            try:
                out += await recover_pack(store, clock, task_id, worker_id, lease.get("lease"),
                                          emit=emit, on_end=on_end)
            except QoError:
                pass
            continue
        try:
            task, etag = await store.load(task_id)
        except (TaskNotFound, QoError):
            continue
        now = clock.now()
        if task.status == RUNNING and task.worker_id == worker_id and task.lease_id == lease.get("lease"):
            reason = f"worker {worker_id} stopped renewing its lease"
            result = await finish(store, task, etag, abandoned(reason, now), now)
            if result is None:
                continue
            task = result[0]
            out.append(task_id)
            if emit:
                emit("recovered" if task.status == PENDING else "failed", task)
            if task.status != PENDING and on_end is not None:
                await on_end(task)  # dead-lettered: its dependents learn of it
        if task.status == PENDING:
            # the worker may have died between the task write and its marker write
            await store.put_marker(task.marker_key(store.queue, clock.now()))
        elif task.ended_key(store.queue) is not None:  # ... or before its ended/ index marker
            await store.put_marker(task.ended_key(store.queue))
    return out


#: a pack recovered from a dead holder this many times (its claims) splits on recovery
SPLIT_AFTER_CLAIMS = 2


async def recover_pack(store: TaskStore, clock: Any, pack_id: str, worker_id: Any, lease_id: Any, *,
                       emit: Any = None, on_end: Any = None) -> list[str]:
    """A dead worker's pack, still under its lease: its running tasks are retried in the
    pack (pending, the attempt counted) or dead-lettered once their attempts are used;
    the lease is cleared and the pack gets a new marker (docs/architecture.md §5k). A
    pack whose holders died twice splits: its tasks to retry leave it as tasks of their
    own, so one that kills its worker no longer takes its siblings' attempts with it."""
    for _ in range(10):
        try:
            pack, etag = await store.packs.load(pack_id)
        except TaskNotFound:
            return []
        if pack.status != "running" or (pack.lease or {}).get("lease_id") != lease_id:
            return []  # not claimed, or held under another lease: nothing of this worker's
        now = clock.now()
        split = pack.claims >= SPLIT_AFTER_CLAIMS
        new, out, ended, tasks, moved = clone(pack), [], [], [], []
        for i in range(len(new.entries)):
            if new.status_of(i) != RUNNING:
                continue
            try:
                task = new.task(i, store.packs.key(pack_id), backend=store.storage.name)
            except CorruptObject as exc:  # one bad task costs itself, not its pack's recovery
                store.bad.report(exc)
                continue
            if task.lease_id != lease_id:
                continue  # running on its own (a single claim of a task of the pack)
            abandoned(f"worker {worker_id} stopped renewing its lease", now)(task)
            task.updated_at = now
            if split and task.status == PENDING:
                new.move_out(i, task)
                moved.append(task)
            else:
                new.put(i, task)
            out.append(task.id)
            tasks.append(task)
            if task.ended_key(store.queue) is not None:
                ended.append(task.ended_key(store.queue))
        requeued = new.settle_status(now)
        # the ended/ index and the moved tasks' markers first: readers verify them
        for key in ended + [t.marker_key(store.queue, now) for t in moved]:
            await store.put_marker(key)
        try:
            await store.packs.replace(new, etag)
        except PreconditionFailed:
            continue
        for task in moved:
            await store.packs.write_moved(task)
        if requeued:
            await store.put_marker(new.marker_key(store.queue))
        for task in tasks:
            if emit:
                emit("recovered" if task.status == PENDING else task.status, task)
            if task.status != PENDING and on_end is not None:
                await on_end(task)  # dead-lettered: its dependents learn of it
        return out
    return []


async def request_cancel(store: TaskStore, worker_id: str, task_id: str, terminate: bool) -> bool:
    """Tell the worker running ``task_id`` that its cancel was requested, by adding it to
    the ``cancel`` map of the worker's record (CAS, keeping the worker's own ``rev``): the
    worker's next heartbeat finds its CAS refused, reads the record once, learns the
    request and writes on. False when the record does not name the task (it ended, or
    its worker is gone: recovery and the stored ``cancel_requested`` do the rest)."""
    key = keys.worker(store.queue, worker_id)
    for _ in range(8):  # the worker's own writes race ours: read again
        try:
            blob = await store.backoff.call(lambda: store.storage.get(key))
            record = stored.decode(blob.data, key)
        except (NotFound, CorruptObject):
            return False
        pack = keys.pack_of(task_id)
        if not isinstance(record.get("leases"), dict) or not (
                task_id in record["leases"] or (pack is not None and pack[0] in record["leases"])):
            return False
        cancels = record.get("cancel") if isinstance(record.get("cancel"), dict) else {}
        if cancels.get(task_id) == "terminate" or (cancels.get(task_id) == "request" and not terminate):
            return True
        record["cancel"] = {**cancels, task_id: "terminate" if terminate else "request"}
        try:
            await store.backoff.call(lambda: store.storage.put(key, dumps(record), if_match=blob.etag))
            return True
        except PreconditionFailed:
            continue
    return False

