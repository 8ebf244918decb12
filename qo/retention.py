"""Deleting finished tasks: ``queue.purge`` and the retention housekeeping.

A finished task is deleted once it ended longer ago than its status's retention (the
queue settings ``retention_completed`` 7d, ``retention_failed`` 30d,
``retention_cancelled`` 7d for cancelled, skipped and expired), never while:

- its idempotency key's record lives (``idempotency_expires_at``): a duplicate submit
  must still find the task its key names, not write it again;
- a dependent still waits on it (an edge ``deps/{id}/...`` exists): the dependent reads
  its output when it runs.

Finding what to delete costs what is deleted, not the queue's history:

- failed, cancelled, skipped, expired: the ``ended/`` index is newest first, so the
  entries past the cut-off are exactly the ones old enough: LIST from the cut-off key,
  one GET per candidate (the task is checked, never trusted from its key), batch deletes;
- completed (no index): task ids begin with their creation time and a task ends after
  it was made, so only ``tasks/`` keys below the cut-off's id can qualify; the keys of
  retained tasks of other statuses are known from the ``ended/`` index and the markers
  (LISTs only) and are not read. Each pass reads at most ``max_examined`` tasks.

Deleting a task deletes its object and its ``ended/`` entry in one batch; a crash in
between leaves an entry whose task is gone, which listings verify away and the next
pass deletes.
A task with an input or output stored apart (``input_ref``/``output_ref``) has its
``payloads/{id}/`` objects deleted just before (one LIST each, one batch delete).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, Callable

import attrs

from . import keys
from .errors import CorruptObject, InvalidInput, TaskNotFound
from .listing import pages
from .payloads import delete_for as delete_payloads
from .model import ENDED_INDEXED, TERMINAL, Task, _short, check_task_type
from .queue_settings import RETENTION_DEFAULTS, RETENTION_MIN

#: which retention setting applies to a finished status
RETENTION_OF = {"completed": "retention_completed", "failed": "retention_failed",
                "cancelled": "retention_cancelled", "skipped": "retention_cancelled",
                "expired": "retention_cancelled"}
#: tasks read per pass at most (the rest wait for the next pass)
MAX_EXAMINED = 10000
#: an idempotency record's expiry is judged with this margin (clocks of producers)
IDEMPOTENCY_MARGIN = 60.0
#: reads and deletes in flight at once
CONCURRENCY = 16


@attrs.define
class PurgeReport:
    deleted: int = 0
    examined: int = 0
    kept: dict[str, int] = attrs.field(factory=dict)  # why candidates were kept, by reason
    more: bool = False  # stopped at max_examined: run again


def check_purge(status: Any, older_than: Any, task_type: Any) -> tuple[str, float, str | None]:
    """Validate purge arguments (before anything is read or deleted)."""
    if status not in TERMINAL:
        raise InvalidInput("status", f"{_short(status)} is not a finished status "
                           f"({', '.join(sorted(TERMINAL))}): only finished tasks can be purged")
    if isinstance(older_than, dt.timedelta):
        older_than = older_than.total_seconds()
    if isinstance(older_than, bool) or not isinstance(older_than, (int, float)) or older_than != older_than:
        raise InvalidInput("older_than", f"{_short(older_than)} is not a duration (a timedelta or seconds)")
    if older_than < RETENTION_MIN:
        raise InvalidInput("older_than", f"{older_than:g} s is below the minimum of {RETENTION_MIN:g} s "
                           "(a task that just ended may still be read by whoever waits on it)")
    if task_type is not None:
        check_task_type(task_type)
    return status, float(older_than), task_type


async def purge(queue: Any, status: str, older_than: float, task_type: str | None = None, *,
                dry_run: bool = False, progress: Callable[[int, int], None] | None = None,
                max_examined: int = MAX_EXAMINED, packs: bool = True) -> PurgeReport:
    """Delete the tasks of ``status`` that ended more than ``older_than`` seconds ago.
    ``packs``: and the packs whose every task is such a task (a pack goes as a whole)."""
    status, older_than, task_type = check_purge(status, older_than, task_type)
    now = queue.clock.now()
    cutoff = now - older_than
    report = PurgeReport()
    if status in ENDED_INDEXED:
        candidates = _ended_candidates(queue, status, cutoff, task_type)
    else:
        candidates = _completed_candidates(queue, cutoff)
    sem = asyncio.Semaphore(CONCURRENCY)
    batch: list[tuple[str, str | None, bool]] = []  # (task id, its ended/ key, has payloads apart)

    async def judge(task_id: str) -> tuple[str, str | None, bool] | None:
        async with sem:
            if keys.pack_of(task_id) is not None and await _in_a_pack(queue, task_id):
                return None  # a task of a pack goes with its pack (below)
            try:
                task, etag = await queue.store.load_object(task_id, purging=True)
            except (TaskNotFound, CorruptObject):
                return None
            if task.purging_at is None:  # judged now; one a purge judged before goes at once
                why = await _kept_because(queue, task, status, cutoff, task_type, now)
                if why is not None:
                    report.kept[why] = report.kept.get(why, 0) + 1
                    return None
                # the delete must lose to any change after our read (a retry, a cancel):
                # the tombstone's CAS is where they meet; a conditional DELETE is not
                # honoured by every store (qo/tombstones.py)
                if not dry_run and await queue.store.tombstone(task, etag, queue.clock.now()) is None:
                    report.kept["changed since it was read"] = report.kept.get("changed since it was read", 0) + 1
                    return None
        return task.id, task.ended_key(queue.name), task.input_ref is not None or task.output_ref is not None

    async def delete(items: list[tuple[str, str | None, bool]]) -> None:
        doomed = [keys.task(queue.name, tid) for tid, _, _ in items] + [k for _, k, _ in items if k]
        await _delete(queue, report, len(items), [tid for tid, _, apart in items if apart], doomed,
                      dry_run=dry_run, progress=progress)

    pending: list[str] = []
    async for task_id in candidates:
        if report.examined >= max_examined:
            report.more = True
            break
        report.examined += 1
        pending.append(task_id)
        if len(pending) >= 200:
            batch += [x for x in await asyncio.gather(*(judge(t) for t in pending)) if x is not None]
            pending.clear()
            if len(batch) >= 500:
                await delete(batch)
                batch = []
    batch += [x for x in await asyncio.gather(*(judge(t) for t in pending)) if x is not None]
    await delete(batch)
    if packs and not report.more:
        async def rule(task: Task) -> str | None:
            return await _kept_because(queue, task, status, cutoff, task_type, now)

        await purge_packs(queue, rule, cutoff, report, dry_run=dry_run, progress=progress,
                          max_examined=max_examined)
    return report


async def purge_packs(queue: Any, rule: Callable[[Task], Any], before: float, report: PurgeReport, *,
                      dry_run: bool = False, progress: Callable[[int, int], None] | None = None,
                      max_examined: int = MAX_EXAMINED) -> None:
    """Delete the packs made before ``before`` whose every task ``rule`` lets go (None),
    in one batch with their tasks' ``ended/`` entries and moved-out objects, after
    their payloads stored apart. A pack still in use, or holding one task to keep,
    stays whole (a pack's ids sort by creation time: newer ones are not read)."""
    prefix = keys.packs_prefix(queue.name)
    end = f"{prefix}{keys.id_floor(before)}"
    sem = asyncio.Semaphore(CONCURRENCY)
    moved: set[str] = set()  # tasks that left their pack: their objects go with it

    async def judge(pack_id: str) -> list[Task] | None:
        async with sem:
            try:
                pack, pack_etag = await queue.store.packs.load(pack_id, purging=True)
            except (TaskNotFound, CorruptObject):
                return None
            if pack.status != "done":
                report.kept["pack in use"] = report.kept.get("pack in use", 0) + 1
                return None
            tasks: list[Task] = []
            own: list[tuple[Task, str]] = []  # tasks that moved out, as read, with their etags
            for i in range(len(pack.entries)):
                if pack.status_of(i) == "moved":  # its own object: read it, never re-made
                    moved.add(pack.task_id(i))
                    try:
                        task, etag = await queue.store.load_object(pack.task_id(i), purging=True)
                    except TaskNotFound:
                        continue
                    except CorruptObject:
                        return None
                    own.append((task, etag))
                else:
                    try:
                        task = pack.task(i)
                    except CorruptObject:
                        return None
                why = None if pack.purging_at is not None or task.purging_at is not None else await rule(task)
                if why is not None:
                    report.kept[why] = report.kept.get(why, 0) + 1
                    return None
                tasks.append(task)
            if dry_run:
                return tasks
            # the pack first (a retry of a task in it CASes the pack), then the tasks that
            # moved out (a retry of one CASes its own object): each delete loses to any
            # change made after our read. A moved task changed since stays: it lives
            # without its pack
            if pack.purging_at is None and not await queue.store.packs.tombstone(pack, pack_etag, queue.clock.now()):
                report.kept["changed since it was read"] = report.kept.get("changed since it was read", 0) + 1
                return None
            for task, etag in own:
                if task.purging_at is None and await queue.store.tombstone(task, etag, queue.clock.now()) is None:
                    moved.discard(task.id)
                    tasks.remove(task)
        return tasks

    async def delete(pack_id: str, tasks: list[Task]) -> None:
        doomed = [keys.pack(queue.name, pack_id)] + [keys.task(queue.name, t.id) for t in tasks if t.id in moved]
        doomed += [k for k in (t.ended_key(queue.name) for t in tasks) if k]
        apart = [t.id for t in tasks if t.input_ref is not None or t.output_ref is not None]
        await _delete(queue, report, len(tasks), apart, doomed, dry_run=dry_run, progress=progress)

    ids: list[str] = []
    async for entry in pages(queue, prefix):
        if entry.key >= end or report.examined >= max_examined:
            report.more = entry.key < end
            break
        parts = entry.key[len(prefix):]
        if "/" in parts or not parts.endswith(".json") or not keys.PACK_ID.match(parts[:-5]):
            continue
        ids.append(parts[:-5])
        report.examined += keys.pack_size(parts[:-5])
    for i in range(0, len(ids), 64):
        chunk = ids[i:i + 64]
        for pack_id, tasks in zip(chunk, await asyncio.gather(*(judge(p) for p in chunk))):
            if tasks is not None:
                await delete(pack_id, tasks)


async def _delete(queue: Any, report: PurgeReport, n: int, apart: list[str], doomed: list[str], *,
                  dry_run: bool, progress: Callable[[int, int], None] | None) -> None:
    """Delete ``doomed`` (1000 keys a batch), after the payloads stored apart of the tasks
    ``apart`` (only those cost a LIST); count ``n`` tasks deleted and say so."""
    if not dry_run and doomed:
        await delete_payloads(queue, apart)
        for i in range(0, len(doomed), 1000):
            await queue.store.delete_markers(doomed[i:i + 1000])
    report.deleted += n
    if progress is not None:
        progress(report.deleted, report.examined)


async def _in_a_pack(queue: Any, task_id: str) -> bool:
    """Whether the pack ``task_id`` names exists (then the task goes with it)."""
    try:
        await queue.store.packs.load(keys.pack_of(task_id)[0])  # type: ignore[index]
    except TaskNotFound:
        return False
    except CorruptObject:
        return True  # reported; kept until somebody looks
    return True


async def _kept_because(queue: Any, task: Task, status: str, cutoff: float, task_type: str | None,
                        now: float) -> str | None:
    """Why ``task`` must stay (None: it may go)."""
    if task.status != status:
        return "another status"
    if task_type is not None and task.task_type != task_type:
        return "another type"
    if task.finished_at is None or task.finished_at >= cutoff:
        return "too recent"
    if task.idempotency_expires_at is not None and task.idempotency_expires_at + IDEMPOTENCY_MARGIN > now:
        return "idempotency key alive"
    if task.has_dependents and await queue.store.list(keys.deps_prefix(queue.name, task.id), limit=1):
        return "a dependent waits on it"
    return None


async def _ended_candidates(queue: Any, status: str, cutoff: float, task_type: str | None):
    """Ids in ``ended/{status}/`` that ended before ``cutoff`` (the index is newest
    first, so they are the entries from the cut-off's key on)."""
    prefix = keys.ended_prefix(queue.name, status)
    cursor: str | None = f"{prefix}{keys.ENDED_EPOCH_MS - keys.ms(cutoff):013d}"
    while True:
        page = await queue.store.list(prefix, start_after=cursor, limit=1000)
        for entry in page:
            e = keys.parse_ended(entry.key)
            if e is None:
                continue
            if task_type is None or e.task_type == task_type:
                yield e.task_id
        if len(page) < 1000:
            return
        cursor = page[-1].key


async def _completed_candidates(queue: Any, cutoff: float):
    """Ids of ``tasks/`` made before ``cutoff`` that no other index names (those are
    retained failures, pending or blocked tasks: not read)."""
    others: set[str] = set()
    for status in ENDED_INDEXED:
        async for entry in pages(queue, keys.ended_prefix(queue.name, status)):
            e = keys.parse_ended(entry.key)
            if e is not None:
                others.add(e.task_id)
    for prefix in (keys.ready_prefix(queue.name), keys.delayed_prefix(queue.name)):
        async for entry in pages(queue, prefix):
            m = keys.parse_marker(entry.key)
            if m is not None:
                others.add(m.task_id)
    async for entry in pages(queue, keys.deps_root(queue.name)):
        d = keys.parse_dep(entry.key)
        if d is not None:
            others.add(d[1])
    end = f"{keys.tasks_prefix(queue.name)}{keys.id_floor(cutoff)}"
    async for entry in pages(queue, keys.tasks_prefix(queue.name)):
        if entry.key >= end:
            return
        task_id = keys.task_id_of(entry.key)
        if task_id is not None and task_id not in others:
            yield task_id


async def apply_retention(queue: Any, *, max_examined: int = MAX_EXAMINED) -> dict[str, int]:
    """One retention pass: purge every finished status past the queue's retention
    setting for it. Returns the number deleted by status."""
    settings = await queue.settings.get()
    deleted: dict[str, int] = {}
    cutoffs: dict[str, float] = {}
    now = queue.clock.now()
    for status in sorted(TERMINAL):
        name = RETENTION_OF[status]
        older_than = settings.get(name, RETENTION_DEFAULTS[name])
        cutoffs[status] = now - older_than
        report = await purge(queue, status, older_than, max_examined=max_examined, packs=False)
        if report.deleted:
            deleted[status] = report.deleted

    async def rule(task: Task) -> str | None:  # each task of a pack by its own status's retention
        if task.status not in cutoffs:
            return "not finished"
        return await _kept_because(queue, task, task.status, cutoffs[task.status], None, now)

    packs = PurgeReport()
    await purge_packs(queue, rule, max(cutoffs.values()), packs, max_examined=max_examined)
    if packs.deleted:
        deleted["packed"] = packs.deleted
    return deleted
