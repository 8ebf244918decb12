"""A worker's side of packs: claim a pack with one CAS, run its tasks in the worker's
slots, write their outcomes back in coalesced CAS writes (docs/architecture.md §5k).

The pack is held under one lease, named in the worker's record by the pack's id from
the announcement before the claim until the last flush: a crash anywhere in between
leaves the pack to recovery (``qo/leases.py``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import attrs

from . import keys
from .errors import CorruptObject, PreconditionFailed, TaskNotFound
from .events import emit
from .model import CANCELLED, PENDING, RUNNING, Task
from .packs import Pack, fork
from .transitions import Missed, handed_back

log = logging.getLogger("qo.worker")

#: outcomes waiting before a flush is written at once
FLUSH_EVERY = 64
#: the longest an outcome waits in memory before its flush
FLUSH_AFTER = 0.5
#: packs one worker holds at once, at most (its slots run one pack's tasks at a time)
MAX_HELD = 2


@attrs.define(eq=False)
class PackItem:
    """One task of a held pack, waiting for a slot (what ``Feed.next`` hands a slot)."""

    run: "PackRun"
    index: int
    key: str
    task_id: str
    #: the task the claim stored as this entry, and that entry: while the held pack still
    #: has this very entry (entries are replaced, never changed in place: ``packs.fork``),
    #: the slot runs this task instead of building it from the entry again
    task: Task | None = None
    entry: dict | None = None
    template: dict | None = None


@attrs.define(eq=False)
class Outcome:
    task: Task
    error: BaseException | None = None
    ran: float | None = None
    handing_back: bool = False
    #: the entry and template the task was built from, and its (has_dependents,
    #: cancel_requested): a flush that finds the same entry in the pack knows them
    #: without rebuilding it
    source: tuple[dict, dict, tuple[bool, bool]] | None = None


@attrs.define(eq=False)
class PackRun:
    """A pack this worker holds: the version it last wrote, and what is not written yet."""

    pack: Pack
    etag: str
    lease_id: str
    waiting: set[int] = attrs.field(factory=set)  # handed to the slots, not started
    running: set[int] = attrs.field(factory=set)
    outcomes: dict[int, Outcome] = attrs.field(factory=dict)
    first_outcome_at: float | None = None
    lost: bool = False
    finished: bool = False
    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    #: one raise of the start bound at a time: slots waiting on it share its write
    raising: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    #: the entries' encodings of the last write (``Pack.to_json``): a flush encodes
    #: only the entries it replaced
    fragments: dict = attrs.field(factory=dict)
    #: entries started (or about to start) in this worker's slots
    started: int = 0
    #: the worker record's evictions (``LeaseBook.evictions``) as of the claim
    evictions: int = 0

    @property
    def id(self) -> str:
        return self.pack.id


class PackRunner:
    """The packs one ``qo.Worker`` holds."""

    def __init__(self, worker: Any):
        self.worker = worker
        self.held: dict[str, PackRun] = {}
        self.claiming = 0  # claims in flight: they count as held
        self._claim_lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        return bool(self.held) or self.claiming > 0

    @property
    def full(self) -> bool:
        return len(self.held) + self.claiming >= MAX_HELD

    # -- claim ------------------------------------------------------------------------

    async def claim(self, marker: keys.Marker, lease_id: str) -> PackRun | Missed:
        """CAS the pack behind ``marker`` to running under ``lease_id``: each pending task
        becomes running (attempt + 1); a pending one whose cancel was requested ends."""
        self.claiming += 1
        try:
            async with self._claim_lock:  # one at a time: a pack listed first is handed out first
                return await self._claim(marker, lease_id)
        finally:
            self.claiming -= 1

    async def _claim(self, marker: keys.Marker, lease_id: str) -> PackRun | Missed:
        w = self.worker
        packs = w.store.packs
        try:
            pack, etag = await packs.load(marker.task_id)
        except TaskNotFound:
            return Missed("pack not found", stale=True, missing=True)
        except CorruptObject as exc:
            return Missed(f"pack object unreadable: {exc.reason}", stale=True, corrupt=True, keep=exc.newer)
        if pack.task_type != marker.task_type:
            return Missed(f"marker names type {marker.task_type!r}, the pack is {pack.task_type!r}",
                          stale=True, dead=True)
        if pack.status != "pending":
            dead = pack.status == "done" and keys.ms(pack.available_at) == keys.ms(marker.due)
            return Missed(f"pack is {pack.status}", stale=True, dead=dead)
        if keys.ms(pack.available_at) != keys.ms(marker.due):
            return Missed("marker does not match the pack's due time", stale=True)
        now = w.clock.now()
        new = fork(pack)  # our own pack (just read): entries are only replaced below
        taken: list[int] = []
        ended: list[str] = []
        tasks: dict[int, Task] = {}
        template_checked = new.check_template()  # checked once here, not for each entry
        for i in range(len(new.entries)):
            if new.status_of(i) != PENDING:
                continue
            try:
                task = new.task(i, packs.key(new.id), backend=w.store.storage.name,
                                template_checked=template_checked)
            except CorruptObject as exc:  # one bad entry costs itself
                w.store.bad.report(exc)
                continue
            if task.cancel_requested:
                task.status, task.finished_at, task.updated_at = CANCELLED, now, now
                ended.append(task.ended_key(w.queue.name))
            else:
                task.status, task.attempt = RUNNING, task.attempt + 1
                task.lease_id, task.worker_id = lease_id, w.worker_id
                task.lease_deadline = now + w.settings.lease_ttl
                task.started_at = task.updated_at = now
                taken.append(i)
                tasks[i] = task
            new.put(i, task)
        new.status, new.claims, new.updated_at = "running", new.claims + 1, now
        new.lease = {"worker_id": w.worker_id, "lease_id": lease_id, "claimed_at": now}
        if not taken:
            new.settle_status(now)
        if ended:  # the ended/ index first: readers verify it against the task
            await asyncio.gather(*(w.store.put_marker(k) for k in ended))
        fragments: dict = {}
        try:
            etag = await packs.replace(new, etag, fragments=fragments)
        except PreconditionFailed:
            return Missed("lost the race", stale=False)
        run = PackRun(new, etag, lease_id, fragments=fragments, evictions=w.book.evictions)
        if taken:
            self.held[new.id] = run
            run.waiting.update(taken)
            w.feed.hand_out([PackItem(run, i, f"{marker.key}#{i:03x}", new.task_id(i), tasks[i], new.entries[i],
                                       new.template) for i in taken], marker.priority, new.available_at)
        else:
            w.book.release(new.id)
        return run

    # -- run ----------------------------------------------------------------------------

    async def run_item(self, item: PackItem) -> None:
        """Run one task of a held pack in this slot, unless the pack was lost or the
        task's cancel was learned meanwhile, or the worker stops (then it is handed back)."""
        run, w = item.run, self.worker
        if item.index not in run.waiting or run.lost or w._stopping.is_set():
            return
        if not await self._may_start(run, item.index) or item.index not in run.waiting or run.lost:
            return  # the worker stops (handed back), a cancel learned meanwhile, or the pack lost
        run.waiting.discard(item.index)
        run.started += 1
        entry, template = run.pack.entries[item.index], run.pack.template
        if item.task is not None and entry is item.entry and template is item.template:
            task = item.task  # the claim's task: its entry is still the one in the pack
        else:
            task = run.pack.task(item.index)
        item.task = item.entry = item.template = None
        source = (entry, template, (task.has_dependents, task.cancel_requested))
        if task.id in w.book.cancels:  # its cancel was written into our record: not started
            now = w.clock.now()
            task.status, task.finished_at, task.updated_at = CANCELLED, now, now
            task.lease_id = task.lease_deadline = task.worker_id = None
            task.cancel_requested = True
            run.outcomes[item.index] = Outcome(task)
        elif not await self._limits_pass(task):  # the worker stops while it waits
            run.waiting.add(item.index)  # handed back with the others not started
            return
        else:
            run.running.add(item.index)
            try:
                await w._execute(task, "", settle=lambda *a, **kw: self._settle(run, item.index, *a, source=source,
                                                                                 **kw))
            finally:
                run.running.discard(item.index)
                if w.limiter.limits:
                    await self._leave_limits(task)
        if not run.waiting and not run.running:
            await self.flush(run)

    async def _may_start(self, run: PackRun, index: int) -> bool:
        """Whether entry ``index`` may start: it is below the start bound of the last record
        stored, raised first when it is not (one record write for a step of entries that
        grows with the pack's pace: about one per heartbeat). A canceller reading that
        record knows which entries may have started (``leases.request_cancel``); the write
        that raises the bound learns the cancels that landed before it. False when the
        worker stops first, or the record was taken over and the pack is no longer ours."""
        w = self.worker
        book = w.book
        while book.stored_bounds.get(run.id, 0) <= index:
            async with run.raising:  # the slots at the bound wait for one write, not one each
                if book.stored_bounds.get(run.id, 0) > index:
                    break  # raised past us by the write we waited for
                if run.lost or w._stopping.is_set():
                    return False
                book.start_bounds[run.id] = max(book.start_bounds.get(run.id, 0), index + self._step(run))
                if not await w._until_stored(book.write):
                    return False
                if book.evictions != run.evictions:  # recovery took our record since: the cancels
                    run.evictions = book.evictions  # in it are lost to us; the pack says what is asked
                    async with run.lock:
                        try:
                            if not await w._until_stored(lambda: self._reread(run)):
                                return False
                        except CorruptObject:  # an entry not started is unusable: as a flush does
                            run.lost = True
                    if run.lost:
                        async with run.lock:
                            self._lost(run, {})
                            self._let_go(run)
                        return False
                self.learn_cancels()
        return True

    def _step(self, run: PackRun) -> int:
        """How many entries past the next one a raised start bound lets start: the
        slots, the entries started so far (so the steps grow), and the pack's pace over
        a heartbeat interval."""
        w = self.worker
        step = max(w.settings.concurrency, run.started)
        claimed_at = (run.pack.lease or {}).get("claimed_at")
        elapsed = w.clock.now() - claimed_at if isinstance(claimed_at, (int, float)) else 0.0
        if elapsed > 0:
            step = max(step, math.ceil(run.started / elapsed * w.settings.heartbeat))
        return min(step, len(run.pack.entries))

    def learn_cancels(self) -> None:
        """The cancels written into our record (``queue.cancel``) of entries not started:
        they end cancelled, never started; the next flush (within ``FLUSH_AFTER``)
        stores it."""
        w = self.worker
        if not w.book.cancels:
            return
        now = w.clock.now()
        for run in self.held.values():
            for i in sorted(run.waiting):
                if run.pack.task_id(i) not in w.book.cancels:
                    continue
                try:
                    task = run.pack.task(i)
                except CorruptObject:
                    continue  # left to the slot, which meets the same
                run.waiting.discard(i)
                task.status, task.finished_at, task.updated_at = CANCELLED, now, now
                task.lease_id = task.lease_deadline = task.worker_id = None
                task.cancel_requested = True
                run.outcomes[i] = Outcome(task)
                if run.first_outcome_at is None:
                    run.first_outcome_at = now

    async def _limits_pass(self, task: Task) -> bool:
        """Wait until every limit that applies to ``task`` (its type's, the global one)
        grants it; the pack's lease is held meanwhile. False if the worker stops first."""
        w = self.worker
        if not w.limiter.limits:
            return True
        while not w._stopping.is_set():
            decision = await w.limiter.acquire(task)
            if decision.granted:
                return True
            w.stats["throttled"] += 1
            now = w.clock.now()
            await w._sleep(min(max(0.01, (decision.retry_at or now + 1.0) - now), 5.0))
        return False

    async def _leave_limits(self, task: Task) -> None:
        try:
            await self.worker.limiter.release(task.id)
        except Exception as exc:  # the entries expire with their lease
            log.warning("worker %s: releasing the limits of %s failed: %s", self.worker.worker_id, task.id, exc)

    async def _settle(self, run: PackRun, index: int, task: Task, change: Any, now: float,
                      handing_back: bool, *, error: BaseException | None, ran: float | None,
                      source: tuple[dict, dict, tuple[bool, bool]] | None = None) -> None:
        change(task)
        task.updated_at = now
        run.outcomes[index] = Outcome(task, error, ran, handing_back, source)
        if run.first_outcome_at is None:
            run.first_outcome_at = now
        if len(run.outcomes) >= FLUSH_EVERY:
            await self.flush(run)

    async def tick(self, now: float) -> None:
        """Housekeeping: write the outcomes that have waited ``FLUSH_AFTER``."""
        for run in list(self.held.values()):
            if run.first_outcome_at is not None and now - run.first_outcome_at >= FLUSH_AFTER:
                await self.flush(run)

    async def close(self) -> None:
        """The worker stops: tasks not started are handed back (pending in their pack,
        attempt not counted), every outcome is written, the packs let go."""
        now = self.worker.clock.now()
        for run in list(self.held.values()):
            for i in sorted(run.waiting):
                task = run.pack.task(i)
                handed_back(now)(task)
                task.updated_at = now
                run.outcomes[i] = Outcome(task, handing_back=True)
            run.waiting.clear()
            await self.flush(run)

    # -- outcomes --------------------------------------------------------------------

    async def flush(self, run: PackRun) -> None:
        """Write the waiting outcomes in one CAS (through outages: the record names the
        pack meanwhile); on a refusal read the pack again and merge, unless the lease
        was lost. Then the projections: moved tasks' objects, a requeued pack's marker."""
        w = self.worker
        async with run.lock:
            if run.finished or not run.outcomes:
                return
            outcomes = dict(run.outcomes)
            written: dict[str, Any] = {}

            async def attempt() -> None:
                written.clear()
                if run.lost:
                    return
                new, moved, ended = self._merge(run, outcomes, w.clock.now())
                requeued = new.settle_status(w.clock.now())
                await asyncio.gather(*(w.store.put_marker(k) for k in ended),  # projections first
                                     *(w.store.put_marker(t.marker_key(w.queue.name, w.clock.now())) for t in moved))
                try:
                    etag = await w.store.packs.replace(new, run.etag, fragments=run.fragments)
                except PreconditionFailed:
                    await self._reread(run)
                    if not run.lost:
                        raise _Again() from None
                    return
                run.pack, run.etag = new, etag
                written.update(moved=moved, requeued=requeued)

            while True:
                try:
                    if not await w._until_stored(attempt):
                        return  # a forced exit: the record names the pack for recovery
                except _Again:
                    continue
                except (CorruptObject, TaskNotFound):  # replaced or deleted under us
                    run.lost = True
                break
            for i in outcomes:
                run.outcomes.pop(i, None)
            run.first_outcome_at = w.clock.now() if run.outcomes else None
            if run.lost:
                self._lost(run, outcomes)
            else:
                moved = written.get("moved", [])
                if moved:
                    await asyncio.gather(*(w.store.packs.write_moved(t) for t in moved))
                if written.get("requeued"):
                    await w.store.put_marker(run.pack.marker_key(w.queue.name))
                await self._report(run, outcomes)
            if run.lost or run.pack.status != "running":
                self._let_go(run)

    def _let_go(self, run: PackRun) -> None:
        """The pack is done with here (ended, requeued or lost): off the record."""
        w = self.worker
        run.finished = True
        self.held.pop(run.id, None)
        w.book.release(run.id)
        w.feed.new_work.set()  # a slot waiting for room lists again

    def _merge(self, run: PackRun, outcomes: dict[int, Outcome], now: float) -> tuple[Pack, list[Task], list[str]]:
        """Our outcomes over the pack as last read. Another writer may have asked for a
        task's cancel or marked it as having dependents: both are kept."""
        w = self.worker
        new = fork(run.pack)  # entries replaced, never changed in place: run.pack stays as stored
        moved: list[Task] = []
        ended: list[str] = []
        for i, outcome in outcomes.items():
            task = outcome.task
            source = outcome.source
            if source is not None and new.entries[i] is source[0] and new.template is source[1]:
                has_dependents, cancel_requested = source[2]  # the entry the task was built from
            else:
                try:
                    stored = new.task(i)
                except CorruptObject:
                    stored = task
                has_dependents, cancel_requested = stored.has_dependents, stored.cancel_requested
            task.has_dependents = task.has_dependents or has_dependents
            task.cancel_requested = task.cancel_requested or cancel_requested
            if task.status == PENDING and task.cancel_requested:
                task.status, task.finished_at = CANCELLED, now
                task.lease_id = task.lease_deadline = task.worker_id = None
            if task.status == PENDING and not outcome.handing_back:
                new.move_out(i, task)  # a retry leaves the pack
                moved.append(task)
                continue
            new.put(i, task)
            key = task.ended_key(w.queue.name)
            if key is not None:
                ended.append(key)
        return new, moved, ended

    async def _reread(self, run: PackRun) -> None:
        """After a refused CAS: the pack as stored now. Still ours: learn the cancels of
        tasks not started (they end cancelled, not run). Another lease: ours was lost."""
        w = self.worker
        try:
            pack, etag = await w.store.packs.load(run.id)
        except (TaskNotFound, CorruptObject):
            run.lost = True
            return
        if pack.status != "running" or (pack.lease or {}).get("lease_id") != run.lease_id:
            run.lost = True
            return
        run.pack, run.etag = pack, etag
        now = w.clock.now()
        for i in sorted(run.waiting):
            task = pack.task(i)
            if task.cancel_requested:
                run.waiting.discard(i)
                task.status, task.finished_at, task.updated_at = CANCELLED, now, now
                task.lease_id = task.lease_deadline = task.worker_id = None
                run.outcomes[i] = Outcome(task)

    def _lost(self, run: PackRun, outcomes: dict[int, Outcome]) -> None:
        w = self.worker
        run.waiting.clear()
        log.warning("worker %s: lost the lease of pack %s: %d outcomes discarded, its tasks not "
                    "started are left to their new holder", w.worker_id, run.id, len(outcomes))
        for outcome in outcomes.values():
            w.stats["lost_lease"] += 1
            w._lease_lost(outcome.task, run.lease_id, settled=True)

    async def _report(self, run: PackRun, outcomes: dict[int, Outcome]) -> None:
        """Count, log and emit what the flush stored; wake the dependents of ended tasks."""
        w = self.worker
        for i, outcome in sorted(outcomes.items()):
            if run.pack.status_of(i) == "moved":
                task = outcome.task
                w.stats["retried"] += 1
                w.tasklog.retried(task, outcome.error, outcome.ran or 0.0,
                                  max(0.0, task.available_at - w.clock.now()))
                emit(w.queue.plugins, "retried", task)
                continue
            if outcome.handing_back:
                w.stats["handed_back"] += 1
                continue
            # the task as the flush stored it: _merge put exactly this one in the pack
            await w._ended(outcome.task, outcome.error, outcome.ran)


class _Again(Exception):
    """The pack changed under a flush and is still ours: merge and write again."""
