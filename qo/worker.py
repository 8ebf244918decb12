"""The worker: claims due tasks by CAS, runs their handlers in slots, records outcomes.

One LIST of the ready index serves all slots; the worker's record (one write) names
the listed candidates before any is claimed and renews every lease it holds; claimed
markers are deleted in batches. See docs/architecture.md for the request budget.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import random
import signal
from typing import Any, Callable

import attrs

from . import keys
from .aging import AgingSettings, age_ready, to_aging_settings
from .errors import Fail, InvalidInput, PreconditionFailed, QoError
from .events import emit
from .handlers import Handler, Registry
from .idempotency import sweep_expired
from .leases import LeaseBook, new_worker_id, sweep
from .model import PENDING, Task, _short, check_input
from .promotion import promote_due
from .queue import ORPHAN_GRACE_SECONDS, Queue
from .queue_settings import REFRESH_SECONDS, TASK_DEFAULTS, overlay
from .transitions import Claimed, Missed, claim, completed, failed, finish, handed_back, requeued_at

log = logging.getLogger(__name__)


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidInput(attribute.name, f"{value!r} must be a positive, finite number")


@attrs.define
class WorkerSettings:
    """How a worker polls, leases and shuts down. Every interval is in seconds."""

    concurrency: int = attrs.field(default=8, validator=_positive)
    #: idle polling backs off from poll_min to poll_max (with jitter) while nothing is due
    poll_min: float = attrs.field(default=0.05, validator=_positive)
    poll_max: float = attrs.field(default=5.0, validator=_positive)
    #: a worker whose record is older than this is presumed dead; its tasks are requeued
    lease_ttl: float = attrs.field(default=30.0, validator=_positive)
    #: default lease_ttl / 3
    heartbeat_interval: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    #: how often this worker looks for dead workers (jittered 0.5x-1.5x)
    sweep_interval: float = attrs.field(default=10.0, validator=_positive)
    #: ready markers per LIST; default max(4 * concurrency, 32)
    list_limit: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    #: listed candidates older than this are listed again (newer, more urgent work)
    buffer_max_age: float = attrs.field(default=2.0, validator=_positive)
    delete_batch: int = attrs.field(default=200, validator=_positive)
    #: backpressure "wait" sleeps a slot at most this long for a token (else: delay)
    rate_limit_max_wait: float = attrs.field(default=2.0, validator=_positive)
    #: how often limit definitions are re-read
    limits_refresh: float = attrs.field(default=5.0, validator=_positive)
    #: how often this worker looks for dependents whose wake-up was lost (a page of edges)
    dependency_sweep_interval: float = attrs.field(default=60.0, validator=_positive)
    #: how often this worker deletes a page (100) of expired idempotency records
    idempotency_sweep_interval: float = attrs.field(default=300.0, validator=_positive)
    #: how often the queue's shared settings (qo.queue_settings) are read again
    queue_settings_refresh: float = attrs.field(default=REFRESH_SECONDS, validator=_positive)
    #: aging of waiting due tasks (see qo.aging); True/False: the QO_AGING* settings, on/off
    aging: AgingSettings = attrs.field(factory=AgingSettings.from_env, converter=to_aging_settings)
    shutdown_timeout: float = attrs.field(default=30.0, validator=_positive)
    orphan_grace: float = attrs.field(default=ORPHAN_GRACE_SECONDS, validator=_positive)
    worker_id: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.list_limit is not None and not isinstance(self.list_limit, int):
            raise InvalidInput("list_limit", f"{self.list_limit!r} must be a positive integer")
        if not isinstance(self.concurrency, int) or self.concurrency > 1024:
            raise InvalidInput("concurrency", f"{self.concurrency!r} must be an integer from 1 to 1024")
        if self.poll_max < self.poll_min:
            raise InvalidInput("poll_max", "must be >= poll_min")
        if self.worker_id is not None and (not isinstance(self.worker_id, str)
                                           or not keys.WORKER_ID.match(self.worker_id)):
            raise InvalidInput("worker_id", f"{_short(self.worker_id)} is not a worker id")

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_interval or self.lease_ttl / 3

    @property
    def listing(self) -> int:
        return min(1000, self.list_limit or max(4 * self.concurrency, 32))


@attrs.define
class TaskContext:
    """What a handler gets besides its input."""

    task: Task
    queue: Queue
    worker: "Worker"
    deadline: float
    #: each dependency's {"status", "output", "task_type"}, by task id
    dependencies: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def attempt(self) -> int:
        return self.task.attempt

    def extend_lease(self, seconds: float) -> None:
        """Let this attempt run ``seconds`` longer than its ``timeout_seconds``
        (the lease itself is renewed by the worker's heartbeat while it runs)."""
        self.deadline = max(self.deadline, self.queue.clock.now() + float(seconds))


class NoLimits:
    """The limiter when no plugin provides one: grants everything."""

    limits: dict = {}

    async def refresh(self, force: bool = False) -> None:
        return None

    async def acquire(self, task: Task) -> Any:
        raise AssertionError("not called without limits")

    async def release(self, task_id: str) -> None:
        return None

    async def renew(self) -> None:
        return None


class Worker:
    """Runs handlers for due tasks of ``queue``: ``await Worker(queue).run()``."""

    def __init__(self, queue: Queue, concurrency: int | None = None, *,
                 settings: WorkerSettings | None = None, **overrides: Any):
        if concurrency is not None:
            overrides["concurrency"] = concurrency
        self.queue = queue
        if settings is not None and not isinstance(settings, WorkerSettings):
            raise InvalidInput("settings", f"{settings!r} is not a qo.WorkerSettings")
        unknown = sorted(set(overrides) - {f.name for f in attrs.fields(WorkerSettings)})
        if unknown:
            raise InvalidInput(unknown[0], "unknown worker setting (see qo.WorkerSettings)")
        #: this worker's own settings; ``settings`` is them under the queue's (qo/queue_settings.py)
        self.own_settings = attrs.evolve(settings or WorkerSettings(), **overrides)
        self.settings = self.own_settings
        self.registry = Registry()
        self.worker_id = self.settings.worker_id or new_worker_id()
        self.clock = queue.clock
        self.store = queue.store
        self.book = LeaseBook(self.store, self.worker_id, self.clock, self.settings.lease_ttl)
        self.stats: collections.Counter[str] = collections.Counter()
        self.limiter = queue.plugins.hook.qo_rate_limiter(
            storage=queue.storage, config={"queue": queue, "lease_ttl": self.settings.lease_ttl,
                                           "refresh_interval": self.settings.limits_refresh}) or NoLimits()
        self._stopping = asyncio.Event()
        self._reset()

    def _reset(self) -> None:
        self._buffer: collections.deque[keys.Marker] = collections.deque()
        self._buffer_at = 0.0
        self._lease_ids: dict[str, str] = {}
        self._taken: set[str] = set()
        self._skip: dict[str, float] = {}
        self._misses: dict[str, int] = {}
        self._trash: list[str] = []
        self._running: dict[str, asyncio.Task] = {}
        self._poll = self.settings.poll_min
        self._next_poll_at = 0.0
        self._nothing_listed = False
        self._peers: set[str] = set()
        self._deleting: set[str] = set()
        self._flushed_at = 0.0
        self._feed_lock = asyncio.Lock()
        self._unsettled: set[str] = set()  # handed back without success: left to recovery
        self._new_work = asyncio.Event()  # set when promotion made tasks due: wakes the feed
        self._waiting = 0

    # -- handlers -----------------------------------------------------------------

    def handler(self, task_type: str | Callable | None = None) -> Callable:
        """Decorator registering an async or plain function for ``task_type``."""
        return self.registry.handler(task_type)

    def add_handlers(self, registry: Registry) -> None:
        for h in registry.handlers.values():
            self.registry.add(h.task_type, h.fn)

    def handles(self, task_type: str) -> bool:
        return task_type in self.registry.handlers

    # -- running ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running tasks finish (or are handed back after shutdown_timeout)."""
        self._stopping.set()

    async def run(self, until_idle: bool = False) -> collections.Counter[str]:
        """Run until stopped (SIGTERM/SIGINT, :meth:`stop`) or, with ``until_idle``, until no
        task of a handled type is pending, delayed or running anywhere. Returns counters."""
        if not self.registry.handlers:
            raise InvalidInput("handlers", "this worker has no handlers registered")
        self._stopping = asyncio.Event()
        self._reset()
        loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="qo-handler")
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
        await self.limiter.refresh(force=True)  # no claim before the limits are known
        await self._apply_queue_settings()
        self._poll = self.settings.poll_min
        slots = [asyncio.create_task(self._slot(), name=f"qo-slot-{i}") for i in range(self.settings.concurrency)]
        background = [asyncio.create_task(self._maintenance(), name="qo-maintenance")]
        if until_idle:
            background.append(asyncio.create_task(self._watch_idle(), name="qo-idle"))
        try:
            await self._stopping.wait()
            done, pending = await asyncio.wait(slots, timeout=self.settings.shutdown_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._stopping.set()
            for t in background + slots:
                t.cancel()
            await asyncio.gather(*background, *slots, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
            with contextlib.suppress(QoError):
                await self.store.delete_markers(self._trash)
                self._trash.clear()
            for task_id in list(self._lease_ids):
                self.book.release(task_id)
            with contextlib.suppress(QoError):
                if not self.book.leases:
                    await self.book.remove()
                else:  # tasks we could not settle: our record names them for recovery
                    await self.book.write()
            self._pool.shutdown(wait=False, cancel_futures=True)
        return self.stats

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Sleep on the queue's clock, waking early when the worker stops (or ``wake`` is set)."""
        if self._stopping.is_set():
            return
        waiters = {asyncio.ensure_future(self.clock.sleep(seconds)), asyncio.ensure_future(self._stopping.wait())}
        if wake is not None:
            waiters.add(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    # -- the feed: one LIST for all slots -------------------------------------------

    async def _slot(self) -> None:
        while not self._stopping.is_set():
            marker = await self._next_marker()
            if marker is None:
                continue
            try:
                await self._process(marker)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker %s: error processing %s", self.worker_id, marker.key)
                self.stats["errors"] += 1
                await self._sleep(self.settings.poll_min)
            finally:
                self._taken.discard(marker.key)

    async def _next_marker(self) -> keys.Marker | None:
        async with self._feed_lock:
            while not self._stopping.is_set():
                now = self.clock.now()
                if self._buffer and now - self._buffer_at <= self.settings.buffer_max_age:
                    m = self._buffer.popleft()
                    if m.key in self._taken or self._skip.get(m.key, 0) > now:
                        self._forget(m.task_id)
                        continue
                    self._taken.add(m.key)
                    return m
                while self._buffer:
                    self._forget(self._buffer.popleft().task_id)
                if now < self._next_poll_at:
                    await self._sleep(self._next_poll_at - now, wake=self._new_work)
                    self._new_work.clear()
                    continue
                try:
                    found = await self._refill(now)
                except QoError as exc:
                    log.warning("worker %s: listing ready tasks failed: %s", self.worker_id, exc)
                    found = False
                if found:
                    self._poll = self.settings.poll_min
                    self._next_poll_at = now
                else:
                    self._next_poll_at = now + self._poll * random.uniform(0.8, 1.2)
                    self._poll = min(self.settings.poll_max, self._poll * 2)
        return None

    def _forget(self, task_id: str) -> None:
        if self._lease_ids.pop(task_id, None) is not None:
            self.book.release(task_id)

    async def _refill(self, now: float) -> bool:
        await self._flush_trash()
        self._skip = {k: t for k, t in self._skip.items() if t > now}
        self._misses = {k: n for k, n in self._misses.items() if k in self._skip or n < 16}
        if len(self._misses) > 10000:
            self._misses.clear()
        entries = await self.store.list(keys.ready_prefix(self.queue.name), limit=self.settings.listing)
        done = set(self._trash) | self._deleting  # claimed by us; their delete is pending
        # tasks we are claiming or running: another marker of one (an aging leftover, a
        # promotion's duplicate) must not re-announce it, or its lease in our record would
        # be replaced and then released on the miss, leaving a running task unnamed
        holding = self.book.leases.keys() - self._lease_ids.keys()
        markers = []
        for e in entries:
            m = keys.parse_marker(e.key)
            if m and self.handles(m.task_type) and m.key not in self._taken and m.key not in self._skip \
                    and m.key not in done and m.task_id not in holding:
                markers.append(m)
        self._nothing_listed = not markers
        if not markers:
            return False
        await self.limiter.refresh()  # only when there is work: an idle worker reads no limits
        markers = self._own_share_first(markers)
        leases = {m.task_id: os.urandom(8).hex() for m in markers}
        await self.book.announce({m.task_id: {"lease": leases[m.task_id], "type": m.task_type} for m in markers})
        self._lease_ids.update(leases)
        self._buffer.extend(markers)
        self._buffer_at = self.clock.now()
        return True

    def _own_share_first(self, markers: list[keys.Marker]) -> list[keys.Marker]:
        """Live workers split the listing by task id: each takes only its own share while
        the listing has some, and helps with the others' (shuffled) when it has none, so
        workers do not all fight for the head of the index."""
        peers = sorted(self._peers | {self.worker_id})
        if len(peers) == 1:
            return markers
        rank, n = peers.index(self.worker_id), len(peers)
        mine = [m for m in markers if int(m.task_id[-8:], 16) % n == rank]
        if mine:
            return mine
        random.shuffle(markers)  # nothing of our share listed: help the others
        return markers

    async def _flush_trash(self) -> None:
        if self._trash:
            batch, self._trash = self._trash, []
            self._deleting.update(batch)
            try:
                await self.store.delete_markers(batch)
            except QoError:
                self._trash.extend(batch)
                raise
            finally:
                self._deleting.difference_update(batch)
            self._flushed_at = self.clock.now()

    # -- one task -----------------------------------------------------------------

    async def _process(self, marker: keys.Marker) -> None:
        lease_id = self._lease_ids.pop(marker.task_id, None)
        if lease_id is None:
            return
        now = self.clock.now()
        granted: list[str] = []

        async def gate(task: Task, etag: str) -> Missed | None:
            refused = await self._rate_gate(marker, task, etag)
            if refused is None:
                granted.append(task.id)
            return refused

        result = await claim(self.store, marker, worker_id=self.worker_id, lease_id=lease_id,
                             lease_ttl=self.settings.lease_ttl, now=now,
                             gate=gate if self.limiter.limits else None)
        if not isinstance(result, Claimed):
            self.book.release(marker.task_id)
            if granted:  # granted, then lost the race: give the concurrency slots back
                await self.limiter.release(marker.task_id)
            if result.reason.startswith("rate limited"):
                return
            self.stats["missed"] += 1
            if result.stale:
                if now - marker.due > self.settings.orphan_grace:
                    self._trash.append(marker.key)  # old and wrong: drop it
                else:  # maybe a producer still writing, or a claimer about to delete it:
                    # look again soon, then less and less often, until it is old
                    misses = self._misses.get(marker.key, 0) + 1
                    self._misses[marker.key] = misses
                    self._skip[marker.key] = min(marker.due + self.settings.orphan_grace,
                                                 now + self.settings.poll_min * 2 ** min(misses, 12))
            return
        self._trash.append(marker.key)
        if len(self._trash) >= self.settings.delete_batch:
            with contextlib.suppress(QoError):
                await self._flush_trash()
        self.stats["claimed"] += 1
        try:
            await self._execute(result.task, result.etag)
        finally:
            if marker.task_id not in self._unsettled:
                self.book.release(marker.task_id)
            if granted:
                with contextlib.suppress(QoError):
                    await self.limiter.release(marker.task_id)

    async def _rate_gate(self, marker: keys.Marker, task: Task, etag: str) -> Missed | None:
        """Pass every limit that applies to ``task``, or apply the limit's backpressure."""
        for _ in range(10):
            decision = await self.limiter.acquire(task)
            if decision.granted:
                return None
            now = self.clock.now()
            retry_at = decision.retry_at or now + 1.0
            mode = decision.limit.backpressure if decision.limit else "delay"
            self.stats["throttled"] += 1
            if mode == "wait" and retry_at - now <= self.settings.rate_limit_max_wait \
                    and self._waiting < max(1, self.settings.concurrency // 2):
                self._waiting += 1  # never more than half the slots wait on limits
                try:
                    await self._sleep(retry_at - now)
                finally:
                    self._waiting -= 1
                continue
            if mode == "skip":  # leave it for later; other work goes on
                self._skip[marker.key] = retry_at
                return Missed("rate limited: skipped", stale=False)
            break
        # delay: back to delayed until the next token; not an attempt, priority kept
        task.available_at = requeued_at(task, retry_at)
        task.updated_at = self.clock.now()
        try:
            await self.store.replace(task, etag)
        except PreconditionFailed:
            return Missed("lost the race", stale=False)
        await self.store.put_marker(task.marker_key(self.queue.name, self.clock.now()))
        self._trash.append(marker.key)
        return Missed("rate limited: delayed", stale=False)

    async def _execute(self, task: Task, etag: str) -> None:
        handler = self.registry.handlers[task.task_type]
        ctx = TaskContext(task, self.queue, self, self.clock.now() + task.timeout_seconds)
        if task.depends_on:
            ctx.dependencies = await self.queue.dependencies.results(task)
        emit(self.queue.plugins, "started", task)
        run = asyncio.ensure_future(self._invoke(handler, task, ctx))
        self._running[task.id] = run
        try:
            output, error = await self._watch(run, ctx)
        except asyncio.CancelledError:  # shutdown: give the task back, uncounted
            run.cancel()
            current = asyncio.current_task()
            if current is not None:  # we handle this cancellation: let the I/O below run
                current.uncancel()   # (timeouts inside a cancelling task misfire otherwise)
            now = self.clock.now()
            self._unsettled.add(task.id)  # until the hand-back is stored, the record keeps it
            with contextlib.suppress(QoError):
                stored = await finish(self.store, task, etag, handed_back(now), now)
                if stored is not None and stored[0].status == PENDING:
                    await self.store.put_marker(stored[0].marker_key(self.queue.name, now))
                    self.stats["handed_back"] += 1
                    self._unsettled.discard(task.id)
                elif stored is not None:  # its cancel was requested: it ends here
                    self._unsettled.discard(task.id)
                    self.stats[stored[0].status] += 1
                    emit(self.queue.plugins, stored[0].status, stored[0])
                    await self._release(stored[0])
                else:
                    self._unsettled.discard(task.id)  # taken over: not ours any more
            raise
        finally:
            self._running.pop(task.id, None)
        if error is None:
            try:
                output = check_input(output, "output")
            except InvalidInput as exc:
                error = Fail(f"handler returned an unusable output: {exc.message}")
        now = self.clock.now()
        if error is None:
            stored = await finish(self.store, task, etag, completed(output, now), now)
            if stored is None:
                self.stats["lost_lease"] += 1
                log.warning("task %s: lease lost; result of attempt %d discarded", task.id, task.attempt)
                return
            self.stats["completed"] += 1
            emit(self.queue.plugins, "succeeded", stored[0])
            await self._release(stored[0])
            return
        delay = self.queue.plugins.hook.qo_retry_delay(task=task, error=error)
        stored = await finish(self.store, task, etag, failed(error, delay, now), now)
        if stored is None:
            self.stats["lost_lease"] += 1
            return
        final = stored[0]
        if final.status == PENDING:
            await self.store.put_marker(final.marker_key(self.queue.name, now))
            self.stats["retried"] += 1
            emit(self.queue.plugins, "retried", final)
        else:
            self.stats[final.status] += 1
            emit(self.queue.plugins, "failed" if final.status == "failed" else final.status, final)
            await self._release(final)

    async def _release(self, task: Task) -> None:
        """Wake (or fail, or skip) the dependents of a task that just ended. A failure
        here is repaired by the dependency sweep: the edges stay until processed."""
        try:
            self.stats["released"] += await self.queue.dependencies.release(task)
        except QoError as exc:
            log.warning("task %s: releasing dependents failed (the sweep will retry): %s", task.id, exc)

    async def _watch(self, run: asyncio.Future, ctx: TaskContext) -> tuple[Any, BaseException | None]:
        """Wait for the handler, enforcing the attempt's deadline on the queue's clock."""
        while True:
            remaining = ctx.deadline - self.clock.now()
            if remaining <= 0:
                run.cancel()
                return None, TimeoutError(f"handler exceeded timeout_seconds={ctx.task.timeout_seconds}")
            timer = asyncio.ensure_future(self.clock.sleep(remaining))
            try:
                await asyncio.wait({run, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
            if run.done():
                if run.cancelled():
                    return None, TimeoutError("handler was cancelled")
                exc = run.exception()
                return (None, exc) if exc is not None else (run.result(), None)

    async def _invoke(self, handler: Handler, task: Task, ctx: TaskContext) -> Any:
        args = (task.input, ctx) if handler.wants_ctx else (task.input,)
        if handler.is_async:
            return await handler.fn(*args)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._pool, functools.partial(handler.fn, *args))
        if asyncio.iscoroutine(result):
            return await result
        return result

    # -- housekeeping ---------------------------------------------------------------

    async def _apply_queue_settings(self) -> None:
        """Read the queue's settings (one GET) and put them over this worker's own; a
        failure keeps the settings in effect (they are read again at the next refresh)."""
        try:
            values = await self.queue.settings.get(refresh=True)
        except QoError as exc:
            log.warning("worker %s: queue settings could not be read, keeping those in effect: %s",
                        self.worker_id, exc)
            return
        new = overlay(self.own_settings, values)
        if new != self.settings:
            differs = [f"{k}={v}" for k, v in sorted(values.items()) if k not in TASK_DEFAULTS]
            log.info("worker %s: queue settings in effect: %s", self.worker_id, ", ".join(differs) or "none")
            self.settings = new
            self._poll = min(max(self._poll, new.poll_min), new.poll_max)

    async def _maintenance(self) -> None:
        """Promote due delayed tasks, renew leases, recover dead workers, flush deletes,
        re-read the queue's settings."""
        s = self.settings
        next_promote = next_sweep = 0.0
        next_settings = self.clock.now() + s.queue_settings_refresh * random.uniform(0.8, 1.2)
        next_idem = self.clock.now() + s.idempotency_sweep_interval * random.uniform(0.1, 1.0)
        idem_cursor: str | None = None
        next_aging = self.clock.now() + s.aging.interval * random.uniform(0.1, 1.0) if s.aging.enabled else float("inf")
        next_deps = self.clock.now() + s.dependency_sweep_interval * random.uniform(0.1, 1.0)
        deps_cursor: str | None = None
        # workers started together only see each other once their records exist: look
        # again soon after our first record write, so the listing is split early
        startup_sweeps: list[float] = [0.0, 0.25, 0.5, 1.0]  # 0.0: waiting for our first record
        while not self._stopping.is_set():
            now = self.clock.now()
            try:
                if now >= next_settings:
                    next_settings = now + s.queue_settings_refresh * random.uniform(0.8, 1.2)
                    await self._apply_queue_settings()
                    if s.aging != self.settings.aging:  # switched on or off, or a new interval
                        next_aging = (now + self.settings.aging.interval * random.uniform(0.1, 1.0)
                                      if self.settings.aging.enabled else float("inf"))
                    s = self.settings
                if now >= next_promote:
                    promotion = await promote_due(self.store, now)
                    next_promote = now + max(s.poll_min, min(self._poll, s.poll_max))
                    if promotion.next_due is not None:
                        next_promote = min(next_promote, promotion.next_due)
                    if promotion.promoted:
                        self._next_poll_at = now  # new work: list again now
                        self._poll = s.poll_min
                        self._new_work.set()
                if self.book.leases and self.book.due(s.heartbeat):
                    await self.book.write()
                    await self.limiter.renew()  # concurrency slots live as long as leases
                elif self.book.dirty and self.book.etag is not None:
                    await self.book.write()  # say promptly that we hold nothing any more
                if startup_sweeps and self.book.etag is not None and not startup_sweeps[0]:
                    startup_sweeps.pop(0)  # our record exists now: sweep soon, a few times
                    next_sweep = min(next_sweep, now + startup_sweeps[0])
                if now >= next_sweep:
                    await self._sweep()
                    if startup_sweeps and startup_sweeps[0]:
                        next_sweep = now + startup_sweeps.pop(0)
                    else:
                        next_sweep = now + s.sweep_interval * random.uniform(0.5, 1.5)
                if now >= next_deps:
                    deps_cursor = await self.queue.dependencies.sweep(deps_cursor)
                    next_deps = now + s.dependency_sweep_interval * random.uniform(0.5, 1.5)
                if now >= next_idem:
                    idem_cursor = await sweep_expired(self.queue, idem_cursor)
                    next_idem = now + s.idempotency_sweep_interval * random.uniform(0.5, 1.5)
                if now >= next_aging and s.aging.enabled:  # about one pass per interval on the queue
                    next_aging = now + s.aging.interval * len(self._peers | {self.worker_id}) * random.uniform(0.5, 1.5)
                    self.stats["aged"] += (await age_ready(self.store, self.queue.plugins, s.aging, now)).moved
                if self._trash and (not self._buffer or now - self._flushed_at >= 0.25):
                    await self._flush_trash()
            except QoError as exc:
                log.warning("worker %s: housekeeping failed: %s", self.worker_id, exc)
            wake = min(next_promote, next_sweep, next_aging, self.book.written_at + s.heartbeat if self.book.leases else next_sweep)
            await self._sleep(max(s.poll_min, min(wake - self.clock.now(), s.poll_max)))

    async def _sweep(self):
        """Recover the tasks of dead workers; learn how many workers are alive."""
        report = await sweep(self.store, self.clock, self_id=self.worker_id,
                             emit=lambda ev, t: emit(self.queue.plugins, ev, t), on_end=self._release)
        self._peers = set(report.alive)
        self.limiter.workers = len(self._peers) + 1
        self.stats["recovered"] += len(report.recovered)
        return report

    async def _watch_idle(self) -> None:
        """Stop once nothing of ours is pending, delayed or running anywhere."""
        while not self._stopping.is_set():
            await self._sleep(max(self.settings.poll_min, min(self._poll, 0.5)))
            if self._running or self._taken or self._buffer or not self._nothing_listed:
                continue
            try:
                if await self._queue_idle():
                    self.stop()
                    return
            except QoError as exc:
                log.warning("worker %s: idle check failed: %s", self.worker_id, exc)

    async def _queue_idle(self) -> bool:
        """Nothing of ours anywhere. Checked in the order tasks move: a task leaves a
        worker's record only after its marker is written, its edges (blocked) only after
        its marker is written, and delayed/ only after its ready marker is written, so
        records, then edges, then delayed/, then ready/ misses none."""
        report = await self._sweep()
        if report.recovered:
            return False
        for record in report.alive.values():
            if any(self.handles(lease.get("type", "")) for lease in (record.get("leases") or {}).values()):
                return False
        if any(self.handles(t) for t in await self.queue.dependencies.blocked_types()):
            return False
        promotion = await promote_due(self.store, self.clock.now())
        if promotion.promoted or promotion.more or any(self.handles(t) for t in promotion.types):
            return False
        entries = await self.store.list(keys.ready_prefix(self.queue.name), limit=1000)
        for e in entries:
            m = keys.parse_marker(e.key)
            if not m or not self.handles(m.task_type):
                continue
            if m.key not in self._skip:
                return False
            try:  # a marker we skip may have become claimable since: look at its task
                task, _ = await self.store.load(m.task_id)
            except QoError:
                continue
            if task.status == PENDING and keys.ms(task.available_at) == keys.ms(m.due):
                self._skip.pop(m.key, None)
                return False
        return not (self._running or self._taken or self._buffer)
