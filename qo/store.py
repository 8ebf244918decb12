"""Typed, retried storage operations on tasks and markers.

Transient failures (``StorageUnavailable``) are retried here with capped exponential
backoff and jitter. A conditional write whose response was lost may have landed: every
task write carries a fresh ``rev`` nonce, so after a failure the writer re-reads and
knows whether the object holds its own write (landed), the version it started from
(retry), or somebody else's (it lost the race).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Callable, TypeVar

from . import keys
from .errors import (
    CorruptObject,
    NotFound,
    PreconditionFailed,
    StorageBusy,
    StorageUnavailable,
    TaskNotFound,
    Throttled,
)
from .model import Task, new_rev
from .packs import PackStore
from .storage import Storage, delete_many
from .stored import BadObjects

log = logging.getLogger(__name__)
T = TypeVar("T")
#: why a task that a purge is deleting is not found
PURGING = "a purge is deleting it"


class Backoff:
    """Retry policy for transient storage errors: ``attempts`` tries, capped, full jitter.

    Before try ``n + 1`` it waits ``uniform(0, min(cap, base * 2**n))``. A throttle
    (``Throttled``: S3 ``SlowDown``, Azure ``ServerBusy``, a 429 or 503) waits from
    ``throttle_base`` (0.2 s) doubling to ``throttle_cap`` (5 s), still full jitter: the
    store is telling every client of the prefix to slow down, and drawn waits spread
    them out where equal ones would return together. ``StorageBusy`` is not retried:
    the backend has waited its own timeout already. ``sleep`` is for tests.
    """

    def __init__(self, attempts: int = 8, base: float = 0.05, cap: float = 2.0, *,
                 throttle_base: float = 0.2, throttle_cap: float = 5.0,
                 sleep: Callable[[float], Awaitable[object]] | None = None):
        self.attempts, self.base, self.cap = attempts, base, cap
        self.throttle_base, self.throttle_cap = throttle_base, max(throttle_cap, cap)
        self.sleep = sleep

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after try ``attempt`` (1-based) failed with ``exc``."""
        base, cap = (self.throttle_base, self.throttle_cap) if isinstance(exc, Throttled) else (self.base, self.cap)
        return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))

    async def pause(self, attempt: int, exc: BaseException | None = None) -> None:
        """Wait before the next try (for callers that run their own retry loop); a
        ``StorageBusy`` is raised again instead, so no loop waits its timeout twice."""
        if isinstance(exc, StorageBusy):
            raise exc
        await (self.sleep or asyncio.sleep)(self.delay(attempt, exc))

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await fn()
            except StorageUnavailable as exc:
                if attempt == self.attempts or isinstance(exc, StorageBusy):
                    raise
                await self.pause(attempt, exc)
        raise AssertionError("unreachable")


class TaskStore:
    """The tasks and markers of one queue."""

    def __init__(self, storage: Storage, queue: str, backoff: Backoff | None = None,
                 bad: BadObjects | None = None):
        self.storage = storage
        self.queue = queue
        self.backoff = backoff or Backoff()
        #: unreadable objects met through this store: each logged once and counted
        self.bad = bad if bad is not None else BadObjects()
        #: the packs of this queue (tasks submitted in bulk, qo/packs.py)
        self.packs = PackStore(self)

    def key(self, task_id: str) -> str:
        return keys.task(self.queue, task_id)

    async def load(self, task_id: str) -> tuple[Task, str]:
        """The task and its etag; ``TaskNotFound`` if there is none (or a purge is
        deleting it), ``CorruptObject`` (reported once) if what is stored is not a task
        this release can use. A task submitted in a pack is read from its pack (one GET)."""
        if keys.pack_of(task_id) is not None:
            return await self.packs.load_task(task_id)
        return await self.load_object(task_id)

    async def load_object(self, task_id: str, *, purging: bool = False) -> tuple[Task, str]:
        """The task stored in ``tasks/{id}.json`` (a task of a pack that moved out, or
        any single task), whatever its id looks like. ``purging``: a task a purge is
        deleting too (else it is ``TaskNotFound``)."""
        key = self.key(task_id)
        try:
            blob = await self.backoff.call(lambda: self.storage.get(key))
        except NotFound:
            raise TaskNotFound(task_id) from None
        task = self.decode(blob.data, key)
        if task.purging_at is not None and not purging:
            raise TaskNotFound(task_id, PURGING)
        return task, blob.etag

    async def tombstone(self, task: Task, etag: str, now: float) -> str | None:
        """Mark the version ``etag`` of ``task`` as being deleted (qo/tombstones.py), so
        no writer can change it any more; its new etag, or None if it changed since."""
        task.purging_at = now
        try:
            return await self.replace(task, etag)
        except (PreconditionFailed, TaskNotFound):
            return None

    def decode(self, data: bytes, key: str, what: str = "skipped") -> Task:
        """The task in ``data`` read from ``key``; a ``CorruptObject`` is reported, then raised."""
        try:
            return Task.from_json(data, key, backend=self.storage.name)
        except CorruptObject as exc:
            self.bad.report(exc, what)
            raise

    async def create(self, task: Task) -> str:
        """Create-only write; ``PreconditionFailed`` if a task with this id exists."""
        task.rev = new_rev()
        data, key = task.to_json(), self.key(task.id)
        uncertain = False
        for attempt in range(1, self.backoff.attempts + 1):
            try:
                return await self.storage.put(key, data, if_none_match=True)
            except StorageUnavailable as exc:
                uncertain = True
                if attempt == self.backoff.attempts:
                    raise
                await self.backoff.pause(attempt, exc)
            except PreconditionFailed:
                if uncertain:  # maybe our own earlier attempt landed
                    current, etag = await self.load(task.id)
                    # ours, possibly changed since (a worker claimed it through its
                    # marker before we re-read): rev alone would call that a loss
                    if current.rev == task.rev or self._same_creation(current, task):
                        return etag
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _same_creation(current: Task, ours: Task) -> bool:
        """The stored task is the one we created: creation time (our clock, to the
        microsecond), type and input match. Another producer creating under the same
        id (idempotency) built its own task at its own time."""
        return (current.created_at == ours.created_at and current.task_type == ours.task_type
                and current.input == ours.input and current.input_ref == ours.input_ref)

    async def replace(self, task: Task, etag: str) -> str:
        """Compare-and-swap ``task`` over version ``etag``; ``PreconditionFailed`` if it changed.
        A task in a pack (its etag names its entry) is written into its pack."""
        if "#entry:" in etag:
            return await self.packs.replace_task(task, etag)
        task.rev = new_rev()
        data, key = task.to_json(), self.key(task.id)
        for attempt in range(1, self.backoff.attempts + 1):
            try:
                return await self.storage.put(key, data, if_match=etag)
            except StorageUnavailable as failure:
                if attempt == self.backoff.attempts:
                    raise
                await self.backoff.pause(attempt, failure)
                try:
                    blob = await self.backoff.call(lambda: self.storage.get(key))
                except NotFound:
                    raise PreconditionFailed("task vanished", backend=self.storage.name, key=key) from None
                if blob.etag == etag:
                    continue  # did not land: try again
                if self.decode(blob.data, key).rev == task.rev:
                    return blob.etag  # landed; only the response was lost
                exc = PreconditionFailed("changed by another writer", backend=self.storage.name, key=key)
                # our write may have landed and been overwritten since: the caller may
                # know better (a claim's fresh lease id on the task says it landed)
                exc.uncertain = True
                raise exc
        raise AssertionError("unreachable")

    async def put_marker(self, key: str) -> None:
        await self.backoff.call(lambda: self.storage.put(key, b""))

    async def delete_markers(self, marker_keys: list[str]) -> None:
        if marker_keys:
            await self.backoff.call(lambda: delete_many(self.storage, marker_keys))

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000,
                   shards: list[int] | None = None):
        """``shards``: only these shards of a spread queue's kind (qo/layout.py)."""
        if shards is None:
            return await self.backoff.call(lambda: self.storage.list(prefix, start_after=start_after, limit=limit))
        return await self.backoff.call(
            lambda: self.storage.list(prefix, start_after=start_after, limit=limit, shards=shards))
