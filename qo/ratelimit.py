"""The default limiter: token buckets and running sets kept in storage by CAS.

One state object per bucket (``limits/state/{id}.json``) holds the tokens, the time
they were computed at, and the tasks running under a concurrency cap. Every change is
read, refill, take, CAS; a lost CAS re-reads.

Batching (the trade-off, docs/architecture.md "Rate limits"): under contention a CAS
per start would storm. A worker takes a batch of ``k = min(rate x reserve_ttl,
burst / 10)`` tokens (at least 1) in one CAS and may use them for ``reserve_ttl``
seconds (0.25 s); unused tokens lapse. Tokens are only ever taken from the bucket, so
over any window of T seconds starts are at most ``rate x T + burst`` plus what a batch
taken just before the window lets through: ``k`` per worker at most. At low rates
(``k = 1``: under 4/s, or a burst under 20) that is exactly ``rate x T + burst``; at
high rates it is at most 10 % of the burst per worker, for a CAS per ``k`` starts.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
from typing import Any

import attrs

from .errors import PreconditionFailed
from .limit_model import BucketState, parse_state, read_state
from .limits import Limit, Limits, bucket_id, scope_id, state_key
from .model import Task

__all__ = ["BucketState", "Decision", "TokenBucketLimiter", "parse_state", "read_state"]


@attrs.frozen
class Decision:
    granted: bool
    retry_at: float | None = None
    limit: Limit | None = None  # the limit that refused


class TokenBucketLimiter:
    """Grants or refuses task starts under the queue's limits, across all workers."""

    def __init__(self, queue: Any, *, lease_ttl: float = 30.0, refresh_interval: float = 5.0,
                 reserve_ttl: float = 0.25):
        self.queue = queue
        self.lease_ttl = lease_ttl
        self.refresh_interval = refresh_interval
        self.reserve_ttl = reserve_ttl
        self.limits: dict[str, Limit] = {}
        self._loaded_at: float | None = None
        self._reserves: dict[str, tuple[int, float]] = {}  # bucket key -> (tokens, usable until)
        self._next_slot: dict[str, float] = {}  # bucket key -> when to send the next refused task
        self.holder = os.urandom(4).hex()  # names this limiter's running entries
        self.workers = 1  # live workers sharing the buckets (the worker keeps it current)
        self._held: dict[str, list[tuple[str, Limit]]] = collections.defaultdict(list)  # task -> buckets

    async def refresh(self, force: bool = False) -> None:
        """Reload the definitions (at most every ``refresh_interval``)."""
        now = self.queue.clock.now()
        if not force and self._loaded_at is not None and now - self._loaded_at < self.refresh_interval:
            return
        self.limits = {l.scope: l for l in await Limits(self.queue).definitions()}
        self._loaded_at = now

    def applicable(self, task: Task) -> list[tuple[Limit, str]]:
        """The limits ``task`` must pass, each with its bucket's state key."""
        out = []
        scopes = ["global", f"task_type:{task.task_type}"]
        key = getattr(task, "rate_limit_key", None)
        if key is not None:
            scopes.append(f"key:{key}" if f"key:{key}" in self.limits else "key:*")
        for scope in scopes:
            limit = self.limits.get(scope)
            if limit is not None:
                out.append((limit, state_key(self.queue.name, bucket_id(limit, key))))
        return out

    async def acquire(self, task: Task) -> Decision:
        """Take what ``task`` needs from every applicable limit, or say when to come back."""
        entered: list[tuple[str, Limit]] = []
        for limit, key in self.applicable(task):
            now = self.queue.clock.now()
            if limit.rate is not None:
                retry_at = await self._take_token(limit, key, now)
                if retry_at is not None:
                    await self._leave(task.id, entered)
                    return Decision(False, retry_at, limit)
            if limit.concurrency is not None:
                if not await self._enter(limit, key, task.id, now):
                    await self._leave(task.id, entered)
                    return Decision(False, now + min(1.0, self.lease_ttl), limit)
                entered.append((key, limit))
        if entered:
            self._held[task.id].extend(entered)
        return Decision(True)

    async def release(self, task_id: str) -> None:
        """The task ended (or was never started): leave its concurrency slots."""
        await self._leave(task_id, self._held.pop(task_id, []))

    async def renew(self) -> None:
        """Extend the running entries of this worker's tasks (with its heartbeat)."""
        by_key: dict[str, tuple[Limit, list[str]]] = {}
        for task_id, held in self._held.items():
            for key, limit in held:
                by_key.setdefault(key, (limit, []))[1].append(task_id)
        for key, (limit, ids) in by_key.items():
            def extend(st: BucketState, now: float, ids: list[str] = ids) -> bool:
                # only tasks still held: one released meanwhile must not come back
                live = [self._entry(t) for t in ids if t in self._held and self._entry(t) in st.running]
                st.running.update({t: now + self.lease_ttl for t in live})
                return bool(live)
            await self._update(key, extend, limit)

    # -- the CAS loops ----------------------------------------------------------------

    async def _take_token(self, limit: Limit, key: str, now: float) -> float | None:
        """None when a token was taken; else the time the next one is due."""
        count, until = self._reserves.get(key, (0, 0.0))
        if count > 0 and until > now:
            self._reserves[key] = (count - 1, until)
            return None
        rate = limit.per_second or 1.0
        ttl = self.reserve_ttl
        want = int(max(1, min(math.floor(rate * ttl), math.floor(limit.capacity / 10))))
        outcome: dict[str, Any] = {}

        def take(state: BucketState, now: float) -> bool:
            if state.tokens < 1:
                outcome["retry_at"] = now + (1 - state.tokens) / rate
                return False
            got = int(min(want, math.floor(state.tokens)))
            state.tokens -= got
            outcome["got"] = got
            return True

        if not await self._update(key, take, limit):
            # line refused tasks up one token apart, not all at the next token (a herd)
            slot = max(self._next_slot.get(key, 0.0), outcome.get("retry_at", now + 1 / rate))
            self._next_slot[key] = slot + self.workers / rate  # the other workers line up theirs
            return slot
        self._reserves[key] = (outcome["got"] - 1, now + ttl)
        return None

    def _entry(self, task_id: str) -> str:
        """A running entry is ours alone: two workers racing to claim one task both
        enter, and the loser's leave must not remove the winner's entry."""
        return f"{task_id}@{self.holder}"

    async def _enter(self, limit: Limit, key: str, task_id: str, now: float) -> bool:
        entry = self._entry(task_id)

        def enter(state: BucketState, now: float) -> bool:
            state.running = state.live_running(now)
            if entry not in state.running and len(state.running) >= (limit.concurrency or 0):
                return False
            state.running[entry] = now + self.lease_ttl
            return True

        return await self._update(key, enter, limit)

    async def _leave(self, task_id: str, held: list[tuple[str, Limit]]) -> None:
        entry = self._entry(task_id)
        for key, limit in held:
            await self._update(key, lambda st, now: st.running.pop(entry, None) is not None, limit)

    async def _update(self, key: str, change: Any, limit: Limit) -> bool:
        """Read, apply ``change(state, now)`` (False: no write), CAS; re-read on conflict."""
        store = self.queue.store
        for attempt in range(20):
            now = self.queue.clock.now()
            state = await read_state(self.queue, key, limit, now)
            changed = change(state, now)
            if not changed and not state.rebased:
                return False
            try:
                if state.etag is None:
                    await store.backoff.call(lambda: store.storage.put(key, state.to_json(), if_none_match=True))
                else:
                    await store.backoff.call(lambda: store.storage.put(key, state.to_json(), if_match=state.etag))
                return changed
            except PreconditionFailed:
                await asyncio.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 6)))
        return False


__all__ = ["BucketState", "Decision", "TokenBucketLimiter", "read_state", "scope_id"]
