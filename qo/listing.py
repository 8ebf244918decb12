"""Listing tasks at a cost that follows the result, not the queue's history.

``since`` on creation time compares the time in task ids, which their producers'
clocks wrote (a bulk cancel ``since`` a task's own time must not take an older one):
on S3 the queue's clock, corrected by the server's Date header, may differ from a
producer's by about a second.

Each status is read from the index that already projects it (docs/architecture.md
§5g): ``pending`` from the ``ready/`` and ``delayed/`` markers, ``running`` from the
live workers' records, ``blocked`` from the ``deps/`` edges, ``failed``, ``cancelled``,
``skipped`` and ``expired`` from the ``ended/`` index. Every candidate is read (one
GET) and kept only if the task really is in that state now: indexes are projections,
and a stale entry costs one GET, never a wrong row. ``completed`` tasks (the happy
path) have no index of their own, so listing them scans ``tasks/``, whose keys are in
creation order: ``since`` bounds that scan by key, and newest first reads back in
growing windows of time from now, so the cost follows the tasks in the window.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from . import keys
from .errors import CorruptObject, TaskNotFound
from .leases import parse_record
from .model import BLOCKED, ENDED_INDEXED, PENDING, RUNNING, Task
from .tombstones import is_tombstone

#: tasks read at once while listing
READ_AHEAD = 32


async def list_tasks(queue: Any, status: str | None, task_type: str | None, limit: int | None, *,
                     newest_first: bool = False, since: float | None = None) -> AsyncIterator[Task]:
    """Tasks in ``status`` (any when None) of ``task_type``, at most ``limit``; created
    (for an ended status: ended) at or after ``since``; oldest first unless ``newest_first``."""
    if status in ENDED_INDEXED:
        candidates = _ended(queue, status, task_type, newest_first, since)

        def keep(task: Task, hint: Any) -> bool:
            return task.status == status and task.finished_at is not None \
                and keys.ms(task.finished_at) == keys.ms(hint)
    else:
        if status == PENDING:
            source = _pending(queue)
        elif status == RUNNING:
            source = _running(queue)
        elif status == BLOCKED:
            source = _blocked(queue)
        else:  # completed, or any status: the tasks themselves
            source = None
        if source is not None:
            candidates = _ordered(source, task_type, newest_first, since)
        else:
            candidates = _tasks(queue, newest_first, since)

        def keep(task: Task, hint: Any) -> bool:
            return (status is None or task.status == status) and (task_type is None or task.task_type == task_type)

    found = 0
    async for task in _read(queue, candidates, keep, newest_first):
        yield task
        found += 1
        if limit is not None and found >= limit:
            return


async def _read(queue: Any, candidates: AsyncIterator[tuple[str, Any]],
                keep: Callable[[Task, Any], bool], newest_first: bool = False) -> AsyncIterator[Task]:
    """Read the candidates ``READ_AHEAD`` at a time, in order; keep those ``keep`` accepts.
    A candidate that vanished or is unreadable (reported once) is skipped. A pack's id
    stands for all its tasks (one GET of the pack, read once per listing)."""
    packs = PackReader(queue)

    async def one(task_id: str) -> list[Task]:
        try:
            if keys.PACK_ID.match(task_id):
                tasks = await packs.tasks(task_id)
                return tasks[::-1] if newest_first else tasks
            if keys.pack_of(task_id) is not None:
                return [await packs.task(task_id)]
            return [(await queue.store.load(task_id))[0]]
        except (TaskNotFound, CorruptObject):
            return []

    batch: list[tuple[str, Any]] = []

    async def flush() -> list[Task]:
        found = await asyncio.gather(*(one(task_id) for task_id, _ in batch))
        out = [t for tasks, (_, hint) in zip(found, batch) for t in tasks if keep(t, hint)]
        batch.clear()
        return out

    async for candidate in candidates:
        batch.append(candidate)
        if len(batch) >= READ_AHEAD:
            for task in await flush():
                yield task
    for task in await flush():
        yield task


async def pages(queue: Any, prefix: str, start_after: str | None = None) -> AsyncIterator[Any]:
    """Every listed entry under ``prefix`` (from ``start_after``), page by page."""
    cursor = start_after
    while True:
        page = await queue.store.list(prefix, start_after=cursor, limit=1000)
        for entry in page:
            yield entry
        if len(page) < 1000:
            return
        cursor = page[-1].key


async def _ended(queue: Any, status: str, task_type: str | None, newest_first: bool,
                 since: float | None) -> AsyncIterator[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    async for entry in pages(queue, keys.ended_prefix(queue.name, status)):
        e = keys.parse_ended(entry.key)
        if e is None or e.status != status or (task_type is not None and e.task_type != task_type):
            continue
        if since is not None and keys.ms(e.finished_at) < keys.ms(since):
            break  # ended before ``since`` (the index is newest first)
        if newest_first:
            yield e.task_id, e.finished_at
        else:
            found.append((e.task_id, e.finished_at))
    for candidate in reversed(found):
        yield candidate


async def _ordered(source: AsyncIterator[tuple[str, str]], task_type: str | None, newest_first: bool,
                   since: float | None) -> AsyncIterator[tuple[str, Any]]:
    """(id, type) pairs from an index, deduplicated, in creation order (ids are time-ordered)."""
    ids: dict[str, None] = {}
    async for task_id, type_ in source:
        if (task_type is None or type_ == task_type) and (since is None or keys.id_time(task_id) >= since):
            ids[task_id] = None
    for task_id in sorted(ids, reverse=newest_first):
        yield task_id, None


async def _pending(queue: Any) -> AsyncIterator[tuple[str, str]]:
    for prefix in (keys.ready_prefix(queue.name), keys.delayed_prefix(queue.name)):
        async for entry in pages(queue, prefix):
            m = keys.parse_marker(entry.key)
            if m is not None:
                yield m.task_id, m.task_type


class PackReader:
    """Tasks of packs for one listing: each pack is read once (one GET), however many
    of its tasks are listed; a task that moved out is read from its own object."""

    def __init__(self, queue: Any):
        self.queue = queue
        self.read: dict[str, asyncio.Future] = {}

    async def pack(self, pack_id: str) -> Any:
        if pack_id not in self.read:
            self.read[pack_id] = asyncio.ensure_future(self.queue.store.packs.load(pack_id))
            if len(self.read) > 256:  # a long listing: forget the oldest
                self.read.pop(next(iter(self.read)))
        return (await self.read[pack_id])[0]

    async def tasks(self, pack_id: str) -> list[Task]:
        """The tasks still in the pack (one that moved out is listed from its own object)."""
        pack = await self.pack(pack_id)
        return [t for t in await asyncio.gather(*(self._entry(pack, i) for i in range(len(pack.entries))
                                                  if pack.status_of(i) != "moved"))
                if t is not None]

    async def task(self, task_id: str) -> Task:
        pack_id, index = keys.pack_of(task_id)  # type: ignore[misc]
        try:
            pack = await self.pack(pack_id)
        except TaskNotFound:  # an id shaped like a pack's that is a task of its own
            return (await self.queue.store.load_object(task_id))[0]
        if index >= len(pack.entries):
            raise TaskNotFound(task_id)
        task = await self._entry(pack, index)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def _entry(self, pack: Any, index: int) -> Task | None:
        try:
            if pack.status_of(index) == "moved":
                return (await self.queue.store.load(pack.task_id(index)))[0]
            return pack.task(index, keys.pack(self.queue.name, pack.id), backend=self.queue.storage.name)
        except CorruptObject as exc:
            self.queue.store.bad.report(exc)
            return None
        except TaskNotFound:
            return None


async def _running(queue: Any) -> AsyncIterator[tuple[str, str]]:
    for record in await live_records(queue, alive_only=False):
        for task_id, lease in record["leases"].items():
            yield task_id, lease.get("type", "")


async def _blocked(queue: Any) -> AsyncIterator[tuple[str, str]]:
    async for entry in pages(queue, keys.deps_root(queue.name)):
        edge = keys.parse_dep(entry.key)
        if edge is not None:
            yield edge[1], edge[2]


async def live_records(queue: Any, *, alive_only: bool = True, limit: int = 1000) -> list[dict[str, Any]]:
    """The readable worker records (at most ``limit``), live ones only unless told."""
    prefix = keys.workers_prefix(queue.name)
    entries = [e for e in await queue.store.list(prefix, limit=limit) if keys.is_direct_child(e.key, prefix)
               and not queue.store.bad.known(e.key, e.etag)]

    async def one(entry: Any) -> dict[str, Any] | None:
        try:
            blob = await queue.store.backoff.call(lambda: queue.storage.get(entry.key))
            if is_tombstone(blob.data):  # a record being deleted (qo/tombstones.py)
                return None
            return parse_record(blob.data, entry.key, backend=queue.storage.name)
        except CorruptObject as exc:
            queue.store.bad.report(exc, etag=entry.etag)
        except Exception:  # removed meanwhile (NotFound) or unreachable: not listed
            pass
        return None

    now = queue.clock.now()
    records = [r for r in await asyncio.gather(*(one(e) for e in entries)) if r is not None]
    return [r for r in records if not alive_only or now <= r["heartbeat_at"] + r["lease_ttl"]]


async def _tasks(queue: Any, newest_first: bool, since: float | None) -> AsyncIterator[tuple[str, Any]]:
    """Task ids from ``tasks/`` and pack ids from ``packs/`` (a pack stands for its
    tasks), merged in creation order."""
    singles = _objects(queue, keys.tasks_prefix(queue.name), _single_id, newest_first, since)
    packs = _objects(queue, keys.packs_prefix(queue.name), _pack_id, newest_first, since)
    async for candidate in _merge(singles, packs, newest_first):
        yield candidate


def _single_id(key: str) -> str | None:
    """A task object's id (a task that moved out of its pack too: its pack skips it)."""
    return keys.task_id_of(key)


def _pack_id(key: str) -> str | None:
    parts = key.split("/")
    if len(parts) == 3 and parts[1] == "packs" and parts[2].endswith(".json") and keys.PACK_ID.match(parts[2][:-5]):
        return parts[2][:-5]
    return None


async def _merge(a: AsyncIterator[tuple[str, Any]], b: AsyncIterator[tuple[str, Any]],
                 reverse: bool) -> AsyncIterator[tuple[str, Any]]:
    """Two streams of ids, each in order, as one (a pack id sorts as its first task's)."""
    end = object()
    x = await anext(a, end)
    y = await anext(b, end)
    while x is not end or y is not end:
        take_x = y is end or (x is not end and ((x[0] > y[0]) if reverse else (x[0] <= y[0])))  # type: ignore[index]
        if take_x:
            yield x  # type: ignore[misc]
            x = await anext(a, end)
        else:
            yield y  # type: ignore[misc]
            y = await anext(b, end)


async def _objects(queue: Any, prefix: str, id_of: Callable[[str], str | None], newest_first: bool,
                   since: float | None) -> AsyncIterator[tuple[str, Any]]:
    """Ids of the objects under ``prefix`` in creation order; newest first reads back from
    now in windows of time growing fourfold (1 h, 4 h, 16 h, ...) until ``since`` or the oldest."""
    floor = f"{prefix}{keys.id_floor(since)}" if since is not None else None
    if not newest_first:
        async for entry in pages(queue, prefix, start_after=floor):
            task_id = id_of(entry.key)
            if task_id is not None:
                yield task_id, None
        return
    first = await queue.store.list(prefix, limit=1)
    if not first:
        return
    oldest = keys.id_time(id_of(first[0].key) or "0" * 24)
    low_limit = max(oldest, since) if since is not None else oldest
    upper: str | None = None  # keys at or above it were yielded by a later window
    width, now = 3600.0, queue.clock.now()
    while True:
        start = max(now - width, low_limit)
        window: list[str] = []
        async for entry in pages(queue, prefix, start_after=f"{prefix}{keys.id_floor(start)}"):
            if upper is not None and entry.key >= upper:
                break
            task_id = id_of(entry.key)
            if task_id is not None:
                window.append(task_id)
        for task_id in reversed(window):
            yield task_id, None
        if start <= low_limit:
            return
        upper, width = f"{prefix}{keys.id_floor(start)}", width * 4
