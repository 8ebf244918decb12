"""Pages of tasks, newest first, with a cursor, at a bounded cost per page whatever the
queue's history: ``await queue.page(...)`` (docs/architecture.md §5g).

It reads the same indexes as ``qo/listing.py`` (``queue.list``):

- failed, cancelled, skipped, expired: the ``ended/{status}/`` index, newest first by
  key; the cursor is the last index key shown (the next page LISTs ``start_after`` it);
- pending, blocked, running: the ``ready/`` + ``delayed/`` markers, the ``deps/`` edges,
  the worker records; ids sorted newest first (ids are time-ordered); the cursor is the
  last id shown;
- completed and "any status": ``tasks/`` keys (creation order), read back from the
  cursor (or now) in windows of time growing fourfold from one minute; a window that
  needs more than ``WINDOW_PAGES`` pages is halved first, so the newest keys are found
  without listing a busy hour whole.

Every candidate is read (one GET) and shown only if the task is in that state now
(indexes are projections: a stale entry costs one GET, never a wrong row).

Bounds per page: at most ``MAX_LISTS`` LISTs (of up to 1000 keys) and at most
``max(limit, MAX_READS)`` GETs. A filter on the type, or ``completed`` (no index), reads
tasks to know whether they match, so such a page may read more than it shows. A page
stopped at a bound says so (``capped``) and its ``next_cursor`` goes on from where it
stopped. Cursors are opaque strings: one belongs to the listing (status) that wrote it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import attrs

from . import keys
from .errors import CorruptObject, InvalidInput, TaskNotFound
from .listing import PackReader, live_records
from .model import BLOCKED, COMPLETED, ENDED_INDEXED, PENDING, RUNNING, Task

#: LIST requests one page may make, at most
MAX_LISTS = 24
#: tasks one page may read (GET), at most (or ``limit``, if larger)
MAX_READS = 200
#: the largest ``limit`` of a page
MAX_LIMIT = 500
#: pages of 1000 keys one window of ``tasks/`` may take before it is halved
WINDOW_PAGES = 2
#: tasks read at once
READ_AHEAD = 32


@attrs.frozen
class TaskPage:
    """One page of ``queue.page``: ``tasks`` newest first; ``next_cursor`` (None: nothing
    more) to pass as ``after`` for the next page; the ``lists`` and ``reads`` (GETs) it
    cost; ``capped``: it stopped at a bound, more may exist beyond what it looked at."""

    tasks: list[Task]
    next_cursor: str | None
    lists: int = 0
    reads: int = 0
    capped: bool = False


class _Budget:
    def __init__(self) -> None:
        self.lists = 0
        self.exhausted = False  # a LIST was refused: the page stopped at its bound

    async def list(self, queue: Any, prefix: str, start_after: str | None) -> list[Any] | None:
        if self.lists >= MAX_LISTS:
            self.exhausted = True
            return None
        self.lists += 1
        return await queue.store.list(prefix, start_after=start_after, limit=1000)


def _bad_cursor() -> InvalidInput:
    return InvalidInput("after", "is not a cursor of this listing (pass the next_cursor of a page of the same status)")


async def task_page(queue: Any, status: str | None, task_type: str | None, since: float | None,
                    after: str | None, limit: int) -> TaskPage:
    """Up to ``limit`` tasks, newest first, after cursor ``after`` (arguments checked by the caller)."""
    now = queue.clock.now()
    budget = _Budget()
    max_reads = max(MAX_READS, limit)
    # exact: every candidate is (barring a stale index entry) a row; else the filter is
    # known only once a task is read, and up to max_reads may be
    exact = task_type is None and status != COMPLETED
    want = limit + 1 if exact else max_reads + 1
    if status in ENDED_INDEXED:
        candidates, complete = await _ended(queue, budget, status, task_type, since, after, want)
    elif status in (PENDING, BLOCKED, RUNNING):
        candidates, complete = await _indexed(queue, budget, status, task_type, since, after, want)
    else:
        candidates, complete = await _tasks(queue, budget, since, after, want, now)

    def keep(task: Task) -> bool:
        return (status is None or task.status == status) and (task_type is None or task.task_type == task_type)

    shown: list[Task] = []
    examined = reads = 0
    capped = False
    packs = PackReader(queue)  # the tasks of one pack cost one GET of it
    while examined < len(candidates) and len(shown) < limit:
        if reads >= max_reads:
            capped = True
            break
        n = min(READ_AHEAD, limit - len(shown) if exact else READ_AHEAD, max_reads - reads)
        batch = candidates[examined:examined + n]
        before = len(packs.read)
        tasks = await asyncio.gather(*(_load(queue, task_id, packs) for task_id, _ in batch))
        reads += sum(1 for task_id, _ in batch if keys.pack_of(task_id) is None) + len(packs.read) - before
        for (task_id, cursor), task in zip(batch, tasks):
            examined += 1
            if task is not None and keep(task):
                shown.append(task)
                if len(shown) >= limit:
                    break
    more = examined < len(candidates) or not complete
    capped = capped or budget.exhausted
    next_cursor = candidates[examined - 1][1] if more and examined else (after if more else None)
    return TaskPage(shown, next_cursor, budget.lists, reads, capped and more)


async def _load(queue: Any, task_id: str, packs: PackReader) -> Task | None:
    try:
        if keys.pack_of(task_id) is not None:
            return await packs.task(task_id)
        return (await queue.store.load(task_id))[0]
    except (TaskNotFound, CorruptObject):
        return None


def _tasks_of(found_id: str) -> list[str]:
    """The task ids an index entry names: a pack's id names every task it was written with."""
    if keys.PACK_ID.match(found_id):
        return [keys.entry_id(found_id, i) for i in range(keys.pack_size(found_id))]
    return [found_id]


async def _ended(queue: Any, budget: _Budget, status: str, task_type: str | None, since: float | None,
                 after: str | None, want: int) -> tuple[list[tuple[str, str]], bool]:
    prefix = keys.ended_prefix(queue.name, status)
    if after is not None and (not after.startswith(prefix) or keys.parse_ended(after) is None):
        raise _bad_cursor()
    out: list[tuple[str, str]] = []
    cursor = after
    while True:
        entries = await budget.list(queue, prefix, cursor)
        if entries is None:
            return out, False
        for entry in entries:
            e = keys.parse_ended(entry.key)
            if e is None or e.status != status:
                continue
            if since is not None and keys.ms(e.finished_at) < keys.ms(since):
                return out, True  # the index is newest first: the rest ended before ``since``
            if task_type is None or e.task_type == task_type:
                out.append((e.task_id, entry.key))
                if len(out) >= want:
                    return out, False
        if len(entries) < 1000:
            return out, True
        cursor = entries[-1].key


async def _indexed(queue: Any, budget: _Budget, status: str, task_type: str | None, since: float | None,
                   after: str | None, want: int) -> tuple[list[tuple[str, str]], bool]:
    if after is not None and not keys.TASK_ID.match(after):
        raise _bad_cursor()
    found: dict[str, str] = {}  # id -> type
    complete = True
    if status == RUNNING:
        budget.lists += 1
        for record in await live_records(queue, alive_only=False):
            for task_id, lease in record["leases"].items():
                found[task_id] = lease.get("type", "")
    else:
        prefixes = [keys.ready_prefix(queue.name), keys.delayed_prefix(queue.name)] if status == PENDING \
            else [keys.deps_root(queue.name)]
        for prefix in prefixes:
            cursor = None
            while True:
                entries = await budget.list(queue, prefix, cursor)
                if entries is None:
                    complete = False
                    break
                for entry in entries:
                    if status == PENDING:
                        m = keys.parse_marker(entry.key)
                        if m is not None:
                            found[m.task_id] = m.task_type
                    else:
                        edge = keys.parse_dep(entry.key)
                        if edge is not None:
                            found[edge[1]] = edge[2]
                if len(entries) < 1000:
                    break
                cursor = entries[-1].key
    ids = sorted((i for f, t in found.items() for i in _tasks_of(f)
                  if (task_type is None or t == task_type) and (since is None or keys.id_time(i) >= since)
                  and (after is None or i < after)), reverse=True)
    out = [(i, i) for i in ids[:want]]
    return out, complete and len(ids) <= want


async def _tasks(queue: Any, budget: _Budget, since: float | None, after: str | None, want: int,
                 now: float) -> tuple[list[tuple[str, str]], bool]:
    """Ids from ``tasks/``, newest first, below ``after``, created at or after ``since``."""
    if after is not None and not keys.TASK_ID.match(after):
        raise _bad_cursor()
    prefix = keys.tasks_prefix(queue.name)
    first = await budget.list(queue, prefix, None)  # the oldest task bounds the search
    if not first:
        return [], True
    oldest_id = next((i for i in (keys.task_id_of(e.key) for e in first) if i), None)
    if oldest_id is None:
        return [], True
    low = max(keys.id_time(oldest_id) - 1, since if since is not None else 0.0)
    upper = f"{prefix}{after}" if after is not None else None
    hi = keys.id_time(after) if after is not None else now + 60
    width = 60.0
    out: list[tuple[str, str]] = []
    while True:
        start = max(hi - width, low)
        window: list[str] = []
        cursor: str | None = f"{prefix}{keys.id_floor(start)}"
        pages = 0
        halved = False
        while True:
            entries = await budget.list(queue, prefix, cursor)
            if entries is None:
                return out, False
            pages += 1
            done = len(entries) < 1000
            for entry in entries:
                if upper is not None and entry.key >= upper:
                    done = True
                    break
                task_id = keys.task_id_of(entry.key)
                if task_id is not None and (since is None or keys.id_time(task_id) >= since):
                    window.append(task_id)
            if done:
                more = await _packs_in(queue, budget, start, upper[len(prefix):] if upper else None, since)
                if more is None:
                    return out, False
                window = sorted(set(window) | set(more))
                break
            if pages >= WINDOW_PAGES and hi - start > 0.002:
                start, width, halved = start + (hi - start) / 2, (hi - start) / 2, True
                window, cursor, pages = [], f"{prefix}{keys.id_floor(start)}", 0
                continue
            cursor = entries[-1].key
        for task_id in reversed(window):
            out.append((task_id, task_id))
            if len(out) >= want:
                return out, False
        if start <= low:
            return out, True
        upper, hi = f"{prefix}{keys.id_floor(start)}", start
        width = width if halved else width * 4


async def _packs_in(queue: Any, budget: _Budget, start: float, upper_id: str | None,
                    since: float | None) -> list[str] | None:
    """The task ids of the packs made from ``start`` to below ``upper_id`` (a pack's id
    says how many tasks it holds: nothing is read); None when the budget ran out."""
    prefix = keys.packs_prefix(queue.name)
    cursor: str | None = f"{prefix}{keys.id_floor(start)}"
    out: list[str] = []
    while True:
        entries = await budget.list(queue, prefix, cursor)
        if entries is None:
            return None
        for entry in entries:
            pack_id = entry.key[len(prefix):].removesuffix(".json")
            if upper_id is not None and keys.entry_id(pack_id, 0) >= upper_id:
                return out
            if keys.is_direct_child(entry.key, prefix) and keys.PACK_ID.match(pack_id) \
                    and (since is None or keys.id_time(pack_id) >= since):
                out += [i for i in _tasks_of(pack_id) if upper_id is None or i < upper_id]
        if len(entries) < 1000:
            return out
        cursor = entries[-1].key


#: entries ``ended_times`` reads, at most (one LIST page)
ENDED_TIMES_LIMIT = 1000


async def ended_times(queue: Any, status: str, since: float | None) -> list[tuple[float, str, str]]:
    """(ended_at, task_id, task_type) from the ``ended/{status}/`` index, newest first,
    ended at or after ``since``: one LIST of at most ``ENDED_TIMES_LIMIT`` keys (each key
    carries its end time; no task is read). As many entries as the limit: there may be more."""
    entries = await queue.store.list(keys.ended_prefix(queue.name, status), limit=ENDED_TIMES_LIMIT)
    out: list[tuple[float, str, str]] = []
    for entry in entries:
        e = keys.parse_ended(entry.key)
        if e is None or e.status != status:
            continue
        if since is not None and keys.ms(e.finished_at) < keys.ms(since):
            break  # newest first: the rest ended before ``since``
        out.append((e.finished_at, e.task_id, e.task_type))
    return out


async def dependents(queue: Any, task_id: str) -> list[tuple[str, str]]:
    """(task_id, task_type) of the tasks waiting on ``task_id``: one LIST of its
    ``deps/`` edges (at most 1000), none when the task says it has no dependents."""
    out: list[tuple[str, str]] = []
    for entry in await queue.store.list(keys.deps_prefix(queue.name, task_id), limit=1000):
        edge = keys.parse_dep(entry.key)
        if edge is not None:
            out.append((edge[1], edge[2]))
    return out
