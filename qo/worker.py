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
import random
import signal
from typing import Any, Callable

import attrs

from . import keys
from .aging import age_ready
from .context import TaskContext
from .errors import Fail, InvalidInput, PreconditionFailed, QoError
from .events import emit
from .feed import Feed
from .handlers import Handler, Registry
from .idempotency import sweep_expired
from .leases import LeaseBook, new_worker_id, sweep
from .model import PENDING, Task, check_input
from .promotion import promote_due
from .queue import Queue
from .queue_settings import overlay, replaced
from .transitions import Claimed, Missed, claim, completed, failed, finish, handed_back, requeued_at
from .worker_settings import WorkerSettings

__all__ = ["Worker", "WorkerSettings", "TaskContext"]

log = logging.getLogger(__name__)


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
        self.feed = Feed(self)
        self._running: dict[str, asyncio.Task] = {}
        self._unsettled: set[str] = set()  # handed back without success: left to recovery
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
        self.feed.poll = self.settings.poll_min
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
                await self.feed.flush()
            self.feed.forget_all()
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

    # -- slots ----------------------------------------------------------------------

    async def _slot(self) -> None:
        while not self._stopping.is_set():
            marker = await self.feed.next()
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
                self.feed.done(marker)

    # -- one task -----------------------------------------------------------------

    async def _process(self, marker: keys.Marker) -> None:
        lease_id = self.feed.take_lease(marker.task_id)
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
                self.feed.look_again_later(marker, now, dead=result.dead)
            return
        await self.feed.drop(marker.key)
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
                self.feed.skip_until(marker.key, retry_at)
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
        self.feed.drop_later(marker.key)
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
            log.info("worker %s: the queue's settings in effect: %s", self.worker_id,
                     ", ".join(replaced(self.own_settings, new)) or "none over this worker's own")
            self.settings = new
            self.feed.settings_changed()

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
                    next_promote = now + max(s.poll_min, min(self.feed.poll, s.poll_max))
                    if promotion.next_due is not None:
                        next_promote = min(next_promote, promotion.next_due)
                    if promotion.promoted:
                        self.feed.wake(now)
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
                    next_aging = now + s.aging.interval * len(self.feed.peers | {self.worker_id}) * random.uniform(0.5, 1.5)
                    self.stats["aged"] += (await age_ready(self.store, self.queue.plugins, s.aging, now)).moved
                feed = self.feed
                if feed.trash and (not feed.buffer or now - feed.flushed_at >= 0.25):
                    await feed.flush()
            except QoError as exc:
                log.warning("worker %s: housekeeping failed: %s", self.worker_id, exc)
            wake = min(next_promote, next_sweep, next_aging, self.book.written_at + s.heartbeat if self.book.leases else next_sweep)
            await self._sleep(max(s.poll_min, min(wake - self.clock.now(), s.poll_max)))

    async def _sweep(self):
        """Recover the tasks of dead workers; learn how many workers are alive."""
        report = await sweep(self.store, self.clock, self_id=self.worker_id,
                             emit=lambda ev, t: emit(self.queue.plugins, ev, t), on_end=self._release)
        self.feed.peers = set(report.alive)
        self.limiter.workers = len(self.feed.peers) + 1
        self.stats["recovered"] += len(report.recovered)
        return report

    async def _watch_idle(self) -> None:
        """Stop once nothing of ours is pending, delayed or running anywhere."""
        while not self._stopping.is_set():
            await self._sleep(max(self.settings.poll_min, min(self.feed.poll, 0.5)))
            if self._running or not self.feed.empty:
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
            if m.key not in self.feed.skip:
                return False
            try:  # a marker we skip may have become claimable since: look at its task
                task, _ = await self.store.load(m.task_id)
            except QoError:
                continue
            if task.status == PENDING and keys.ms(task.available_at) == keys.ms(m.due):
                self.feed.skip.pop(m.key, None)
                return False
        return not (self._running or self.feed.taken or self.feed.buffer)
