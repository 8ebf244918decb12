"""The feed: the ready index as a worker's slots see it. One LIST serves every slot.

Before any listed candidate is claimed, the worker's record names it with a fresh lease
id (one write for the whole listing), so a claim that lands while the worker dies is
found by recovery. Claimed markers are deleted in batches (``trash``). Live workers
split a listing by task id so they do not all fight for its head. An idle feed backs
off from ``poll_min`` to ``poll_max`` (jittered) and is woken early by promotion.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import os
import random
from typing import Any, Callable

from . import keys
from .layout import Rotation, shard_count
from .errors import QoError

log = logging.getLogger(__name__)

#: pages of 1000 listed past other types' markers in one refill, at most
FOREIGN_PAGES = 10
#: claimed markers kept for deletion while deletes fail, at most (a dead marker left
#: behind costs one GET to whoever lists it next, who then drops it)
TRASH_MAX = 10000
#: how long the end of a run of other types' markers is remembered
FOREIGN_HINT_SECONDS = 5.0
#: what ``refill`` returns when it found nothing yet but the listing goes on
MORE = "more"
#: a busy worker lists about this many seconds of its recent throughput at once (at
#: least ``settings.listing``, at most 1000): a LIST and the record write announcing its
#: candidates are per refill, and a local store's LIST costs the whole directory
LISTING_HORIZON = 0.1


class Feed:
    """The listed candidates of one worker and what it knows about the ready index."""

    def __init__(self, worker: Any):
        """``worker``: the ``qo.Worker`` whose slots this feeds (not imported here: the
        worker imports this module)."""
        self.worker = worker
        self.buffer: collections.deque[keys.Marker] = collections.deque()
        self.buffer_at = 0.0
        #: task id -> the lease id announced in the record for a listed candidate
        self.lease_ids: dict[str, str] = {}
        #: marker keys a slot is processing
        self.taken: set[str] = set()
        #: marker key -> not before (a stale marker looked at again later, a skipped task)
        self.skip: dict[str, float] = {}
        self.misses: dict[str, int] = {}
        #: claimed (or dropped) markers, deleted in batches; ``deleting``: in flight
        self.trash: list[str] = []
        self.deleting: set[str] = set()
        self.flushed_at = 0.0
        self.poll = worker.settings.poll_min
        self.next_poll_at = 0.0
        self.nothing_listed = False
        #: tasks of packs this worker holds, waiting for a slot (before any listed
        #: marker): a heap, most urgent pack first, then the pack's order
        self.local: list[tuple[int, float, str, int, Any]] = []
        #: live workers other than this one (from the last sweep)
        self.peers: set[str] = set()
        self.lock = asyncio.Lock()
        self.new_work = asyncio.Event()  # set when promotion made tasks due
        #: shard (None: a flat queue) -> (key, until): the last run of other types'
        #: markers there ends at or after key
        self.foreign_until: dict[int | None, tuple[str, float]] = {}
        #: the shard a spread queue's next refill lists (qo/layout.py)
        self.rotation = Rotation()
        #: candidates handed to slots since the last refill, and this worker's recent
        #: rate of taking them (tasks/s, smoothed): what sizes the next listing
        self.handed = 0
        self.rate = 0.0

    @property
    def empty(self) -> bool:
        """No candidate listed or taken, and the last listing found nothing of ours."""
        return not self.taken and not self.buffer and not self.local and self.nothing_listed

    def hand_out(self, items: list[Any], priority: int, due: float) -> None:
        """Tasks of a claimed pack: the slots take them before anything listed, the
        most urgent pack's first."""
        for item in items:
            heapq.heappush(self.local, (-priority, due, item.key, item.index, item))
        self.new_work.set()

    async def next(self) -> Any:
        """The next candidate for a slot, listing again when the buffer is empty or old;
        None once the worker stops."""
        w = self.worker
        async with self.lock:
            while not w._stopping.is_set():
                if self.local:
                    item = heapq.heappop(self.local)[-1]
                    self.taken.add(item.key)
                    return item
                if w.packs.full:  # enough tasks held: list again once a pack is let go
                    await w._sleep(w.settings.poll_max, wake=self.new_work)
                    self.new_work.clear()
                    continue
                now = w.clock.now()
                if self.buffer and now - self.buffer_at <= w.settings.buffer_max_age:
                    m = self.buffer.popleft()
                    if m.key in self.taken or self.skip.get(m.key, 0) > now:
                        self.forget(m.task_id)
                        continue
                    self.taken.add(m.key)
                    self.handed += 1
                    return m
                while self.buffer:
                    self.forget(self.buffer.popleft().task_id)
                if now < self.next_poll_at:
                    await w._sleep(self.next_poll_at - now, wake=self.new_work)
                    self.new_work.clear()
                    continue
                outage = w.outages["listing ready tasks"]
                try:
                    found = await self.refill(now)
                except Exception as exc:  # not a QoError: a bug, a backend's; said once, backed off alike
                    if not isinstance(exc, QoError) and not outage.failing:
                        log.exception("worker %s: listing ready tasks failed", w.worker_id)
                    self.next_poll_at = now + max(self.poll, outage.failed(exc))
                    continue
                outage.ok()
                if found == MORE:  # cut short (or a spread queue's turn goes on): list on now, the backoff kept
                    self.next_poll_at = now
                elif found:
                    self.poll = w.settings.poll_min
                    self.next_poll_at = now
                else:
                    self.next_poll_at = now + self.poll * random.uniform(0.8, 1.2)
                    self.poll = min(w.settings.poll_max, self.poll * 2)
        return None

    def done(self, marker: keys.Marker) -> None:
        """A slot finished with ``marker`` (whatever became of it)."""
        self.taken.discard(marker.key)

    def take_lease(self, task_id: str) -> str | None:
        """The lease id announced for a listed candidate; None if it was forgotten."""
        return self.lease_ids.pop(task_id, None)

    def forget(self, task_id: str) -> None:
        """A listed candidate will not be claimed: its announced lease leaves the record."""
        if self.lease_ids.pop(task_id, None) is not None:
            self.worker.book.release(task_id)

    def forget_all(self) -> None:
        for task_id in list(self.lease_ids):
            self.forget(task_id)

    def wake(self, now: float) -> None:
        """New work is due (promotion): list again now."""
        self.next_poll_at = now
        self.poll = self.worker.settings.poll_min
        self.new_work.set()

    def settings_changed(self) -> None:
        s = self.worker.settings
        self.poll = min(max(self.poll, s.poll_min), s.poll_max)

    async def drop(self, key: str) -> None:
        """Delete a claimed (or dead) marker with the next batch; flush a full batch now."""
        self.trash.append(key)
        if len(self.trash) >= self.worker.settings.delete_batch:
            with contextlib.suppress(QoError):  # kept in trash: the next flush tries again
                await self.flush()

    def drop_later(self, key: str) -> None:
        """Delete with the next batch (no I/O here)."""
        self.trash.append(key)

    def look_again_later(self, marker: keys.Marker, now: float, dead: bool = False, keep: bool = False) -> None:
        """A marker whose task could not be claimed and looks stale: maybe its producer is
        still writing, or a claimer is about to delete it. Look again soon, then less
        and less often; once older than ``orphan_grace`` (or ``dead``), drop it. A
        ``keep`` marker (its task is a newer release's) is never dropped, only skipped."""
        s = self.worker.settings
        if not keep and (dead or now - marker.due > s.orphan_grace):
            self.drop_later(marker.key)  # old and wrong
            return
        misses = self.misses.get(marker.key, 0) + 1
        self.misses[marker.key] = misses
        later = now + s.poll_min * 2 ** min(misses, 12)
        self.skip[marker.key] = max(later, now + s.orphan_grace) if keep else min(marker.due + s.orphan_grace, later)

    def skip_until(self, key: str, when: float) -> None:
        self.skip[key] = when

    async def flush(self) -> None:
        """Delete the batch of claimed markers (one DeleteObjects per 1000)."""
        if self.trash:
            batch, self.trash = self.trash, []
            self.deleting.update(batch)
            try:
                await self.worker.store.delete_markers(batch)
            except BaseException:  # failed, or cancelled (a stopping worker flushes once more)
                self.trash.extend(batch)
                if len(self.trash) > TRASH_MAX:  # deletes keep failing: the oldest claimed
                    del self.trash[:len(self.trash) - TRASH_MAX]  # markers are dead; any worker drops them
                raise
            finally:
                self.deleting.difference_update(batch)
            self.flushed_at = self.worker.clock.now()

    async def refill(self, now: float) -> bool | str:
        """LIST the ready index, keep what this worker can run and is not already
        handling, announce the candidates in the record, buffer them. True: some were
        buffered; ``MORE``: none yet, list on at once (the listing was cut short, or a
        spread queue's turn of shards is not over); False: nothing to do."""
        w = self.worker
        try:
            await self.flush()
        except QoError:
            pass  # deletes failing must not stop claiming: housekeeping retries them, backing off
        self.skip = {k: t for k, t in self.skip.items() if t > now}
        self.misses = {k: n for k, n in self.misses.items() if k in self.skip or n < 16}
        if len(self.misses) > 10000:
            self.misses.clear()
        done = set(self.trash) | self.deleting  # claimed by us; their delete is pending
        # tasks we are claiming or running: another marker of one (an aging leftover, a
        # promotion's duplicate) must not re-announce it, or its lease in our record would
        # be replaced and then released on the miss, leaving a running task unnamed
        holding = w.book.leases.keys() - self.lease_ids.keys()

        def ours(entries: list) -> list[keys.Marker]:
            out = []
            for e in entries:
                m = keys.parse_marker(e.key)
                if m and m.kind == "ready" and w.handles(m.task_type) and m.key not in self.taken \
                        and m.key not in self.skip and m.key not in done and m.task_id not in holding:
                    out.append(m)
            return out

        self.measure(now)
        markers, complete = await self.list_ours(now, ours)
        self.nothing_listed = not markers and complete
        if not markers and not complete:
            return MORE  # cut short: go on listing from where it stopped, without waiting
        if not markers:
            return False
        await w.limiter.refresh()  # only when there is work: an idle worker reads no limits
        markers = self.own_share_first(markers)
        if not markers:  # only others' fresh work: theirs to claim; look again later
            return False
        leases = {m.task_id: os.urandom(8).hex() for m in markers}
        await w.book.announce({m.task_id: {"lease": leases[m.task_id], "type": m.task_type} for m in markers})
        self.lease_ids.update(leases)
        self.buffer.extend(markers)
        self.buffer_at = w.clock.now()
        return True

    def measure(self, now: float) -> None:
        """Fold the rate at which slots took the last listing's candidates into
        ``rate`` (nothing is learnt from an empty listing or a clock that stood still)."""
        if self.handed and now > self.buffer_at:
            sample = self.handed / (now - self.buffer_at)
            self.rate = sample if not self.rate else (self.rate + sample) / 2
        self.handed = 0

    def listing_size(self) -> int:
        """Markers one LIST asks for: ``settings.listing`` (``list_limit`` when set), or
        ``LISTING_HORIZON`` seconds of this worker's recent rate when that is more, times
        the live workers that split the listing; at most 1000 (one LIST page)."""
        s = self.worker.settings
        own = s.listing
        if s.list_limit is None:
            own = max(own, int(self.rate * LISTING_HORIZON))
        return min(1000, own * (len(self.peers) + 1))

    async def list_ours(self, now: float, ours: Callable[[list], list[keys.Marker]]) -> tuple[list[keys.Marker], bool]:
        """The head of the ready index, as far as it takes to reach markers of types this
        worker handles: a queue shared by several services may hold any number of other
        types' tasks ahead of ours. One LIST when the head has some of ours; else pages
        of 1000 from where the last run of others' markers ended (remembered for
        ``FOREIGN_HINT_SECONDS``), at most ``FOREIGN_PAGES`` per refill. Returns the
        markers and whether the listing reached them or the end of the index.

        A spread queue (qo/layout.py) is listed one shard a refill, in turn: a refill
        costs one LIST whatever the shard count, each shard is in priority order, and a
        shard found empty is followed by the next at once; the index is empty once a
        whole turn of shards was."""
        w = self.worker
        prefix = keys.ready_prefix(w.queue.name)
        shards = shard_count(w.store.storage)
        only = [self.rotation.take(shards)] if shards > 1 else None
        where = only[0] if only else None
        # live workers split a listing by task id: list enough that each finds its own
        # candidates in it, so LISTs and record writes per task do not grow with the
        # number of workers
        size = self.listing_size()

        def reached_end() -> tuple[list[keys.Marker], bool]:  # nothing of ours in the index (or shard)
            self.foreign_until.pop(where, None)
            return [], only is None or self.rotation.found(False, shards)

        page = await w.store.list(prefix, limit=size, shards=only)
        found = ours(page)
        if found:
            self.rotation.found(True, shards)
            return found, True
        if len(page) < size:
            return reached_end()
        cursor = page[-1].key
        hint = self.foreign_until.get(where)
        if hint is not None and hint[1] > now and hint[0] > cursor:
            cursor = hint[0]  # skip the run of others' markers we listed a moment ago
        for _ in range(FOREIGN_PAGES):
            page = await w.store.list(prefix, start_after=cursor, limit=1000, shards=only)
            found = ours(page)
            if found:
                self.foreign_until[where] = (cursor, now + FOREIGN_HINT_SECONDS)
                self.rotation.found(True, shards)
                return found, True
            if len(page) < 1000:
                return reached_end()
            cursor = page[-1].key
        self.foreign_until[where] = (cursor, now + FOREIGN_HINT_SECONDS)  # go on from here next time
        return [], False

    def own_share_first(self, markers: list[keys.Marker]) -> list[keys.Marker]:
        """Live workers split the listing by task id: each takes only its own share while
        the listing has some, and helps with the others' (shuffled) when it has none, so
        workers do not all fight for the head of the index."""
        me = self.worker.worker_id
        peers = sorted(self.peers | {me})
        if len(peers) == 1:
            return markers
        rank, n = peers.index(me), len(peers)
        mine = [m for m in markers if int(m.task_id[-8:], 16) % n == rank]
        if mine:
            return mine
        # nothing of our share listed: help with the others' markers their owners have
        # left waiting a whole buffer cycle (a younger one its owner is about to claim:
        # taking it would only make one of two claim writes fail)
        # (a cycle: the buffer's age, or our own poll interval when that is shorter: the
        # owner polls about as often as we do)
        now, age = self.worker.clock.now(), min(self.worker.settings.buffer_max_age, self.poll)
        waiting = [m for m in markers if now - m.due >= age]
        random.shuffle(waiting)
        return waiting
