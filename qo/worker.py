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
import random
import signal
from typing import Any, Awaitable, Callable

import attrs

from . import keys
from .aging import age_ready
from .clock import SystemClock
from .context import TaskContext
from .errors import Cancelled, CorruptObject, Fail, InvalidInput, PreconditionFailed, QoError, StorageError, TaskNotFound
from .events import emit
from .feed import Feed
from .handlers import Handler, HandlerHost, Registry
from .idempotency import sweep_expired, sweep_expiry_index
from .leases import LeaseBook, new_worker_id, sweep
from .meter import RequestRates
from .model import PENDING, RUNNING, Task
from .outage import Outages, wait_until_reachable
from .pack_runner import FLUSH_AFTER, PackItem, PackRunner
from .packs import PACK_OUTPUT_INLINE
from .payloads import attempt_input, discard_output, store_output
from .promotion import promote_due
from .layout import Rotation, shard_count
from .retention import apply_retention
from .queue import Queue
from .queue_settings import overlay, replaced
from .transitions import Claimed, Expired, Missed, claim, completed, failed, finish, handed_back, requeued_at
from .worker_log import TaskLog
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


class Worker(HandlerHost):
    """Runs handlers for due tasks of ``queue``: ``await Worker(queue).run()``.

    ``Worker([q1, q2, ...], concurrency, weights=None)`` runs several queues under one
    concurrency budget, in strict order or by weight (``qo/multi_worker.py``)."""

    def __new__(cls, queue: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(queue, (list, tuple)):
            from .multi_worker import MultiQueueWorker

            return MultiQueueWorker(queue, *args, worker_class=cls, **kwargs)
        return super().__new__(cls)

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
        self.book.counts = self.stats  # the record carries them (queue.stats())
        self.book.requests = RequestRates(queue.requests, self.clock)  # and the queue's requests
        self.book.running = lambda: len(self._running)  # and what runs now
        #: one log line per task event, and the summary while busy (qo/worker_log.py)
        self.tasklog = TaskLog(self.worker_id, queue.name, self.clock)
        self.limiter = queue.plugins.hook.qo_rate_limiter(
            storage=queue.storage, config={"queue": queue, "lease_ttl": self.settings.lease_ttl,
                                           "refresh_interval": self.settings.limits_refresh}) or NoLimits()
        self._stopping = asyncio.Event()
        #: a multi-queue worker's shared concurrency budget and this queue's rank in it
        self.gate: tuple[Any, int] | None = None
        #: a multi-queue worker's check that every queue is idle (``run(until_idle=True)``)
        self.idle_gate: Callable[[Any], Awaitable[bool]] | None = None
        self.handle_signals = True  # False when a multi-queue worker forwards them
        self._reset()

    def _reset(self) -> None:
        self.feed = Feed(self)
        #: the packs this worker holds (tasks submitted in bulk, qo/pack_runner.py)
        self.packs = PackRunner(self)
        # a pack claimed may start this many entries before our record is stored again
        # (its start bound, qo/pack_runner.py): the slots, or a heartbeat's worth of our pace
        self.book.start_step = lambda: max(self.settings.concurrency,
                                           math.ceil(self.feed.rate * self.settings.heartbeat))
        #: task id -> (handler future, handler, started at) of what runs now
        self._running: dict[str, tuple[asyncio.Future, Handler, float]] = {}
        #: claimed tasks whose outcome is not stored yet: our record keeps naming them
        self._unsettled: set[str] = set()
        #: task id -> the context of what runs now (``ctx.cancel_requested`` is set on it)
        self._contexts: dict[str, TaskContext] = {}
        #: tasks whose async handler we cancelled on ``qo cancel --terminate``
        self._terminated: set[str] = set()
        #: task id -> the lease id under which we said its lease was lost (once per claim)
        self._leases_lost: dict[str, str | None] = {}
        self._lapses_checked = self.book.lapses
        #: set when this worker wrote a delayed marker: wakes housekeeping from its nap
        self._delayed_written = asyncio.Event()
        self._waiting = 0
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()  # a second signal: exit now
        self._done = asyncio.Event()  # every slot has ended: housekeeping ends too
        self._interrupting = False  # the shutdown timeout passed: async handlers are cancelled
        self.outages = Outages(self.clock.now)
        self._until_idle = False
        #: the earliest due time of a delayed marker this worker wrote since housekeeping looked
        self.delayed_due: float | None = None
        #: why ``run(until_idle=True)`` gave up (storage failing too long); raised by run()
        self.fatal: QoError | None = None

    # -- running ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running tasks finish. After ``shutdown_timeout`` async handlers
        are cancelled and their tasks handed back; a sync handler (a thread) cannot be
        stopped, so the worker keeps its lease alive and waits for it (``force()`` to
        exit now and leave it to recovery)."""
        self._stopping.set()

    def force(self) -> None:
        """Exit now: what still runs stays named in this worker's record, and another
        worker retries it once the lease has passed."""
        self._stopping.set()
        self._forced.set()

    @property
    def forced(self) -> bool:
        """The last run ended on ``force()`` (a second signal): handlers may still run."""
        return self._forced.is_set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stopping.is_set():
            log.info("worker %s: %s: no new tasks; %s (send it again to exit now)", self.worker_id, sig.name,
                     f"waiting up to {self.settings.shutdown_timeout:g} s for {self._describe_running()}"
                     if self._running else "stopping")
            self.stop()
        elif not self._forced.is_set():
            log.warning("worker %s: second %s: exiting now; %s", self.worker_id, sig.name,
                        f"{self._describe_running()} stay named in {self.book.key} and are retried by "
                        f"another worker once their lease ({self.settings.lease_ttl:g} s) has passed"
                        if self._running else "nothing was running")
            self.force()

    def _describe_running(self) -> str:
        now = self.clock.now()
        items = sorted(self._running.items(), key=lambda kv: kv[1][2])
        shown = ", ".join(f"{tid} ({h.task_type}, {'sync' if not h.is_async else 'async'}, {now - t0:.0f} s)"
                          for tid, (_, h, t0) in items[:5])
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return f"{len(items)} running task{'s' if len(items) != 1 else ''}: {shown}{more}"

    async def run(self, until_idle: bool = False) -> collections.Counter[str]:
        """Run until stopped (SIGTERM/SIGINT, :meth:`stop`) or, with ``until_idle``, until no
        task of a handled type is pending, delayed or running anywhere. Returns counters."""
        if not self.registry.handlers:
            raise InvalidInput("handlers", "this worker has no handlers registered")
        self._reset()
        loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="qo-handler")
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT) if self.handle_signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:  # an outage at start-up is waited out; no claim before the limits are known
            reachable = await wait_until_reachable(self._first_contact, self.clock, stopping=self._stopping,
                                                   timeout=self.settings.startup_timeout,
                                                   who=f"worker {self.worker_id}")
        except BaseException:
            self._unwind(loop, installed)
            raise
        if not reachable:  # stopped while waiting for the store: nothing was started
            self._unwind(loop, installed)
            return self.stats
        await self._apply_queue_settings()
        await self._meet_peers()
        self.feed.poll = self.settings.poll_min
        self._until_idle = until_idle
        try:
            self._lifecycle("qo_worker_started", strict=True)
        except QoError:  # a plugin refused (its setting is invalid): start nothing, leave nothing
            with contextlib.suppress(QoError):
                await self.book.remove()
            self._unwind(loop, installed)
            raise
        # under a multi-queue gate one more slot than the budget, so a queue always has a
        # candidate waiting at the gate when one of its tasks ends (strict order holds)
        n = self.settings.concurrency + (1 if self.gate is not None else 0)
        slots = [asyncio.create_task(self._slot(), name=f"qo-slot-{i}") for i in range(n)]
        background = [asyncio.create_task(self._maintenance(), name="qo-maintenance"),
                      asyncio.create_task(self._heartbeats(), name="qo-heartbeat"),
                      asyncio.create_task(self._summaries(), name="qo-summary")]
        if until_idle:
            background.append(asyncio.create_task(self._watch_idle(), name="qo-idle"))
        try:
            await self._stopping.wait()
            await self._drain(slots)
        finally:
            self._stopping.set()
            self._done.set()
            for t in background + slots:
                t.cancel()
            await asyncio.gather(*background, *slots, return_exceptions=True)
            self._lifecycle("qo_worker_stopping")
            for sig in installed:
                loop.remove_signal_handler(sig)
            if not self._forced.is_set():
                try:  # tasks of held packs not started go back; every outcome is written
                    await self.packs.close()
                except Exception:  # what is not written stays named in our record
                    log.exception("worker %s: letting go of its packs failed", self.worker_id)
            with contextlib.suppress(QoError):
                await self.feed.flush()
            self.feed.forget_all()
            with contextlib.suppress(QoError):
                if not self.book.leases:
                    await self.book.remove()
                else:  # tasks we could not settle: our record names them for recovery
                    await self.book.write()
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    async def _first_contact(self) -> None:
        """The worker's first storage requests: one LIST that is not retried (an outage
        is waited out by ``run``, not by the store's backoff), then the limits."""
        await self.queue.storage.list(keys.workers_prefix(self.queue.name), limit=1)
        await self.limiter.refresh(force=True)

    def _unwind(self, loop: asyncio.AbstractEventLoop, installed: list[signal.Signals]) -> None:
        """Undo what ``run`` set up before it started any work."""
        self._pool.shutdown(wait=False)
        for sig in installed:
            loop.remove_signal_handler(sig)

    def _lifecycle(self, hook: str, strict: bool = False) -> None:
        """Call ``qo_worker_started`` or ``qo_worker_stopping``; a plugin's exception is
        logged, except a ``QoError`` from ``qo_worker_started`` (``strict``): that is a
        plugin refusing to run (an invalid setting), and the worker does not start."""
        try:
            getattr(self.queue.plugins.hook, hook)(worker=self)
        except QoError:
            if strict:
                raise
            log.exception("worker %s: a %s plugin failed", self.worker_id, hook)
        except Exception:
            log.exception("worker %s: a %s plugin failed", self.worker_id, hook)

    async def _drain(self, slots: list[asyncio.Task]) -> None:
        """Let the running tasks finish; after ``shutdown_timeout`` cancel the async
        handlers (their tasks are handed back once they have stopped) and keep waiting
        for sync ones, whose leases stay renewed. A forced exit stops waiting."""
        pending = await self._wait_slots(slots, self.settings.shutdown_timeout)
        if not pending or self._forced.is_set():
            return
        self._interrupting = True
        cancelled = 0
        for run, handler, _ in list(self._running.values()):
            if handler.is_async:
                cancelled += run.cancel()
        if cancelled:
            log.info("worker %s: shutdown timeout (%g s): cancelled %d async handler%s; their tasks are handed "
                     "back once stopped", self.worker_id, self.settings.shutdown_timeout, cancelled,
                     "" if cancelled == 1 else "s")
        pending = await self._wait_slots(pending, 0.1)  # the cancelled ones hand back
        while pending and not self._forced.is_set():
            log.warning("worker %s: shutting down, waiting for %s (a sync handler cannot be interrupted; "
                        "its lease stays renewed until it ends; signal again to exit now)",
                        self.worker_id, self._describe_running())
            pending = await self._wait_slots(pending, 10.0)

    async def _wait_slots(self, slots: list[asyncio.Task], timeout: float) -> list[asyncio.Task]:
        """Wait up to ``timeout`` for ``slots`` to end (or a forced exit); the ones left."""
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            deadline = self.clock.now() + timeout
            pending = [t for t in slots if not t.done()]
            while pending and not self._forced.is_set():
                timer = asyncio.ensure_future(self.clock.sleep(max(0.0, deadline - self.clock.now())))
                try:
                    await asyncio.wait([*pending, forced, timer], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    timer.cancel()
                pending = [t for t in pending if not t.done()]
                if self.clock.now() >= deadline:
                    break
            return pending
        finally:
            forced.cancel()

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Sleep on the queue's clock, waking early when the worker stops (or ``wake`` is set)."""
        await self._nap(seconds, self._stopping, *([wake] if wake is not None else []))

    async def _nap(self, seconds: float, *events: asyncio.Event) -> None:
        """Sleep on the queue's clock until ``seconds`` pass or one of ``events`` is set."""
        if any(e.is_set() for e in events):
            return
        waiters = {asyncio.ensure_future(self.clock.sleep(seconds)), *(asyncio.ensure_future(e.wait()) for e in events)}
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
            if self.gate is not None and not await self._through_gate():
                self.feed.forget(marker.task_id)  # stopping: not claimed, its lease leaves the record
                self.feed.done(marker)
                continue
            try:
                await self._process(marker)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # our bug, a plugin's or a backend's: this marker, not the slot, pays
                self.stats["errors"] += 1
                await self._sleep(max(self.settings.poll_min, self._unexpected("processing tasks", exc, marker.key)))
            else:
                self.outages["processing tasks"].ok()
            finally:
                self.feed.done(marker)
                if self.gate is not None:
                    self.gate[0].release(self.gate[1])

    async def _through_gate(self) -> bool:
        """A multi-queue worker's slot for this candidate: True once granted, False if the
        worker stops first."""
        gate, rank = self.gate  # type: ignore[misc]
        acquire = asyncio.ensure_future(gate.acquire(rank))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([acquire, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
            if not self._stopping.is_set():
                return True
            gate.release(rank)
            return False
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
        return False

    # -- one task -----------------------------------------------------------------

    async def _process(self, marker: keys.Marker | PackItem) -> None:
        if isinstance(marker, PackItem):
            await self.packs.run_item(marker)
            return
        if marker.is_pack:
            await self._process_pack(marker)
            return
        lease_id = self.feed.take_lease(marker.task_id)
        if lease_id is None:
            return
        now = self.clock.now()
        granted: list[str] = []
        claimed = False

        async def gate(task: Task, etag: str) -> Missed | None:
            refused = await self._rate_gate(marker, task, etag)
            if refused is None:
                granted.append(task.id)
            return refused

        try:
            result = await claim(self.store, marker, worker_id=self.worker_id, lease_id=lease_id,
                                 lease_ttl=self.settings.lease_ttl, now=now,
                                 gate=gate if self.limiter.limits else None)
            if isinstance(result, Expired):
                claimed = True  # like a claim: our record names it until its ended marker is stored
                self._unsettled.add(marker.task_id)
                await self.feed.drop(marker.key)
                await self._expired(result.task)
                return
            if not isinstance(result, Claimed):
                if result.reason.startswith("rate limited"):
                    return
                self.stats["missed"] += 1
                if result.corrupt:
                    self.stats["bad_objects"] += 1
                if result.repair is not None:
                    await self.store.put_marker(result.repair)
                if result.stale:
                    self.feed.look_again_later(marker, now, dead=result.dead, keep=result.keep)
                return
            claimed = True
            self._unsettled.add(marker.task_id)  # until its outcome is stored
            await self.feed.drop(marker.key)
            self.stats["claimed"] += 1
            await self._execute(result.task, result.etag)
        finally:
            # a task whose outcome is not stored stays in our record: recovery finds it
            if not claimed or marker.task_id not in self._unsettled:
                self.book.release(marker.task_id)
            if granted and (not claimed or marker.task_id not in self._unsettled):
                try:  # granted, then lost the race or ended: give the concurrency slots back
                    await self.limiter.release(marker.task_id)
                except Exception as exc:  # the entries expire with their lease
                    log.warning("worker %s: releasing the limits of %s failed: %s", self.worker_id,
                                marker.task_id, exc)

    async def _process_pack(self, marker: keys.Marker) -> None:
        """Claim a pack (one CAS for up to 256 tasks): its tasks go to the slots. The
        record names the pack until its last outcome is stored (qo/pack_runner.py)."""
        if self.packs.full:  # enough held: leave it to others, or to us later
            self.feed.forget(marker.task_id)
            return
        lease_id = self.feed.take_lease(marker.task_id)
        if lease_id is None:
            return
        claimed = False
        try:
            result = await self.packs.claim(marker, lease_id)
            if isinstance(result, Missed):
                self.stats["missed"] += 1
                if result.corrupt:
                    self.stats["bad_objects"] += 1
                if result.stale:
                    self.feed.look_again_later(marker, self.clock.now(), dead=result.dead, keep=result.keep)
                return
            claimed = True
            self.stats["claimed_packs"] += 1
            await self.feed.drop(marker.key)
        finally:
            if not claimed:
                self.book.release(marker.task_id)

    async def _expired(self, task: Task) -> None:
        """A task the claim found past its ``expires_at`` is stored ``expired``: write its
        ``ended/`` index marker (through storage outages, as an outcome: our record names
        the task until it is written; a forced exit leaves it there for recovery), then
        say so and release its dependents (an expired dependency counts as failed)."""
        if not await self._until_stored(lambda: self._put_projection(task)):
            return  # a forced exit: stays unsettled, named in our record
        self._unsettled.discard(task.id)
        self.stats["expired"] += 1
        self.tasklog.expired(task)
        emit(self.queue.plugins, "expired", task)
        await self._release(task)

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
        await self._put_marker(task)
        self.feed.drop_later(marker.key)
        return Missed("rate limited: delayed", stale=False)

    async def _put_marker(self, task: Task) -> None:
        """Write a pending task's marker; a delayed one tells housekeeping when to promote."""
        key = task.marker_key(self.queue.name, self.clock.now())
        await self.store.put_marker(key)
        if key.startswith(keys.delayed_prefix(self.queue.name)):
            self.delayed_due = min(self.delayed_due or task.available_at, task.available_at)
            self._delayed_written.set()  # a nap backed off to poll_max would promote it late

    async def _execute(self, task: Task, etag: str, settle: Callable[..., Awaitable[Any]] | None = None) -> None:
        """Run the handler of a claimed task and store the outcome. Whatever raises here
        ends as an outcome (a failed attempt), never as a task left running. ``settle``:
        how the outcome is stored instead of a CAS of its own (a task of a pack)."""
        ctx = TaskContext(task, self.queue, self, self.clock.now() + task.timeout_seconds,
                          cancel_requested=task.cancel_requested)
        run: asyncio.Future | None = None
        started: float | None = None
        try:
            handler = self.registry.handlers.get(task.task_type)
            if handler is None:  # its marker named a type we handle; the task another
                raise Fail(f"worker {self.worker_id} has no handler for task type {task.task_type!r}")
            # an input stored apart is read for the handler, never written back inline
            value = await attempt_input(self.queue, task) if task.input_ref is not None else task.input
            if task.depends_on:
                ctx.dependencies = await self.queue.dependencies.results(task)
            self.tasklog.started(task)
            emit(self.queue.plugins, "started", task)
            run = asyncio.ensure_future(self._invoke(handler, value, ctx))
            started = self.clock.now()
            self._running[task.id] = (run, handler, started)
            self._contexts[task.id] = ctx
            self._apply_cancels()  # a request learned while the attempt was being set up
            output, error = await self._watch(run, ctx)
        except asyncio.CancelledError:
            # a forced exit (or run() itself cancelled): what still runs stays in our
            # record; recovery retries it once the lease has passed
            if run is not None and not run.done():
                run.cancel()
            raise
        except Exception as exc:  # before the handler ran (dependencies unreadable, ...)
            output, error = None, exc
        finally:
            self._running.pop(task.id, None)
            self._contexts.pop(task.id, None)
            self._terminated.discard(task.id)
        now = self.clock.now()
        handing_back = run is not None and run.cancelled() and self._interrupting
        output_ref = None
        if handing_back:
            change = handed_back(now)  # shutdown: the interrupted attempt is not counted
        else:
            if error is None:
                try:  # a large output is PUT at this attempt's own key before the finish CAS
                    output, output_ref = await store_output(
                        self.queue, task, output, PACK_OUTPUT_INLINE if settle is not None else None)
                except InvalidInput as exc:
                    error = Fail(f"handler returned an unusable output: {exc.message}")
                except QoError as exc:  # storage failed: an ordinary failed attempt
                    error = exc
            if error is None:
                change = completed(output, now, output_ref)
            else:
                delay = self._retry_delay(task, error)
                change = failed(error, delay, now)
        ran = now - started if started is not None else None
        if settle is not None:
            if output_ref is not None and handing_back:
                await discard_output(self.queue, output_ref)
            await settle(task, change, now, handing_back, error=error, ran=ran)
            return
        if await self._settle(task, etag, change, now, handing_back, error=error, ran=ran) is False \
                and output_ref is not None:
            await discard_output(self.queue, output_ref)  # not recorded: nobody will read it

    def _retry_delay(self, task: Task, error: BaseException) -> float | None:
        try:
            return self.queue.plugins.hook.qo_retry_delay(task=task, error=error)
        except Exception:  # a retry policy's bug must not strand the task
            log.exception("worker %s: the qo_retry_delay hook failed for task %s; retrying in 10 s",
                          self.worker_id, task.id)
            return 10.0

    async def _settle(self, task: Task, etag: str, change: Any, now: float, handing_back: bool = False, *,
                      error: BaseException | None = None, ran: float | None = None) -> bool | None:
        """Store the outcome (and a retry's marker, or an ended task's index entry),
        through storage outages: the task stays in our record, its lease renewed, until
        both are stored; a forced exit leaves it there for recovery (None). Then release
        it and wake its dependents. False: the lease was lost and the outcome discarded."""
        lease_id = task.lease_id
        stored: tuple[Task, str] | None = None
        uncertain = lost = False

        async def attempt() -> None:
            nonlocal task, etag, stored, uncertain, lost
            if stored is None:
                if uncertain:  # the last write may have landed: look before writing again
                    current, current_etag = await self.store.load(task.id)
                    if current.rev == task.rev:
                        stored = current, current_etag
                    elif current.status == RUNNING and current.lease_id == lease_id:
                        task, etag = current, current_etag
                    else:
                        lost = True
                        return
                if stored is None:
                    uncertain = True
                    stored = await finish(self.store, task, etag, change, now)
                    if stored is None:
                        lost = True
                        return
            await self._put_projection(stored[0])

        try:
            if not await self._until_stored(attempt):
                return None  # a forced exit: stays unsettled, named in our record
        except (CorruptObject, TaskNotFound):  # replaced by garbage, or deleted, under us
            lost = True
        self._unsettled.discard(task.id)
        if lost or stored is None:
            self.stats["lost_lease"] += 1
            self._lease_lost(task, lease_id, settled=True)
            return False
        await self._ended(stored[0], error, ran, handing_back)
        return True

    async def _ended(self, final: Task, error: BaseException | None, ran: float | None,
                     handing_back: bool = False) -> None:
        """Count, log and emit a stored outcome; wake the dependents of an ended task."""
        now = self.clock.now()
        if final.status == PENDING and handing_back:
            self.stats["handed_back"] += 1
            self.tasklog.handed_back(final)
        elif final.status == PENDING:
            self.stats["retried"] += 1
            self.tasklog.retried(final, error, ran or 0.0, max(0.0, final.available_at - now))
            emit(self.queue.plugins, "retried", final)
        else:
            self.stats[final.status] += 1
            if final.status == "completed":
                self.tasklog.completed(final, ran or 0.0)
            elif final.status == "failed":
                self.tasklog.failed(final, error, ran)
            elif final.status == "cancelled":
                self.tasklog.cancelled(final)
            emit(self.queue.plugins, {"completed": "succeeded"}.get(final.status, final.status), final)
            await self._release(final)

    async def _until_stored(self, attempt: Callable[[], Awaitable[None]]) -> bool:
        """Run ``attempt`` until no storage error stops it, backing off through an outage
        (the task stays named in our record meanwhile); False on a forced exit."""
        outage = self.outages["storing task outcomes"]
        while True:
            try:
                await attempt()
            except (CorruptObject, TaskNotFound):
                raise
            except QoError as exc:
                await self._nap(outage.failed(exc), self._forced)
                if self._forced.is_set():
                    return False
                continue
            outage.ok()
            return True

    async def _put_projection(self, task: Task) -> None:
        """What must follow a stored outcome: a pending task's marker, an ended one's
        ``ended/`` index entry (failed, cancelled, expired)."""
        if task.status == PENDING:
            await self._put_marker(task)
        elif task.ended_key(self.queue.name) is not None:
            await self.store.put_marker(task.ended_key(self.queue.name))

    async def _release(self, task: Task) -> None:
        """Wake (or fail, or skip) the dependents of a task that just ended. A failure
        here is repaired by the dependency sweep: the edges stay until processed."""
        try:
            self.stats["released"] += await self.queue.dependencies.release(task)
        except QoError as exc:
            log.warning("task %s: releasing dependents failed (the sweep will retry): %s", task.id, exc)

    def _lease_lost(self, task: Task, lease_id: str | None, *, settled: bool = False) -> None:
        """Say once per claim that ``task``'s lease (``lease_id``) was lost and it may run
        again elsewhere: when the worker learns it while the handler runs, or when the
        outcome's CAS is refused (``settled``: then the claim is over)."""
        if self._leases_lost.get(task.id, "") != lease_id:
            self.tasklog.lease_lost(task)
        if settled:
            self._leases_lost.pop(task.id, None)
        else:
            self._leases_lost[task.id] = lease_id

    async def _check_leases(self) -> None:
        """After our record was taken over by recovery, or a heartbeat landed only once
        the lease had run out: read each running task (one GET each, only then); one that
        is no longer running under our lease was taken over, and its handler sees
        ``ctx.lease_lost`` (its outcome's CAS will be refused: the lease id says whose
        attempt it is)."""
        for task_id, ctx in list(self._contexts.items()):
            if ctx.lease_lost:
                continue
            lease_id = ctx.task.lease_id
            try:
                current: Task | None = (await self.store.load(task_id))[0]
            except (TaskNotFound, CorruptObject):
                current = None
            lost = current is None or current.status != RUNNING or current.lease_id != lease_id
            if lost and self._contexts.get(task_id) is ctx:  # still running: not settled yet
                ctx.note_lease_lost()
                self._lease_lost(ctx.task, lease_id)

    def _apply_cancels(self) -> None:
        """Cancels written into our record (``queue.cancel``): the handler sees
        ``ctx.cancel_requested``; with terminate an async handler is cancelled now (a
        thread cannot be stopped: a sync handler only sees the flag). A task of a held pack
        not started yet is not started: it ends cancelled."""
        self.packs.learn_cancels()
        for task_id, mode in self.book.cancels.items():
            ctx = self._contexts.get(task_id)
            if ctx is None:
                continue
            ctx.cancel_requested = True
            entry = self._running.get(task_id)
            if mode == "terminate" and entry is not None and entry[1].is_async and not entry[0].done() \
                    and task_id not in self._terminated:
                self._terminated.add(task_id)
                entry[0].cancel()

    async def _watch(self, run: asyncio.Future, ctx: TaskContext) -> tuple[Any, BaseException | None]:
        """Wait for the handler, enforcing the attempt's deadline on the queue's clock."""
        passes = 0
        while True:
            if run.done():
                if run.cancelled():
                    if ctx.task.id in self._terminated:
                        return None, Cancelled(f"task {ctx.task.id}: cancelled (qo cancel --terminate)")
                    return None, TimeoutError("handler was cancelled")
                exc = run.exception()
                return (None, exc) if exc is not None else (run.result(), None)
            remaining = ctx.deadline - self.clock.now()
            if remaining <= 0:
                run.cancel()
                self.tasklog.timed_out(ctx.task, ctx.task.timeout_seconds)
                return None, TimeoutError(f"handler exceeded timeout_seconds={ctx.task.timeout_seconds}")
            passes += 1
            if passes == 1:  # a short async handler is done after the loop's next pass:
                await asyncio.sleep(0)  # then no waiter and no timer were needed
            elif type(self.clock) is SystemClock:  # its sleep is the loop's: a timer, no task
                await asyncio.wait((run,), timeout=remaining)
            else:
                timer = asyncio.ensure_future(self.clock.sleep(remaining))
                try:
                    await asyncio.wait({run, timer}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    timer.cancel()

    async def _invoke(self, handler: Handler, value: Any, ctx: TaskContext) -> Any:
        """Run the handler on ``value`` (the task's input, read if stored apart)."""
        args = (value, ctx) if handler.wants_ctx else (value,)
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

    async def _heartbeats(self) -> None:
        """Renew this worker's leases (its record) every ``heartbeat``, in a loop of its
        own: a slow housekeeping step (a sweep's LIST and GETs on a loaded store) never
        holds a renewal back past the lease. Goes on whatever else fails, and while the
        worker shuts down, until its last task has ended."""
        while not self._done.is_set():
            s = self.settings
            await self._step("writing this worker's record (heartbeat)", self._heartbeat)
            now = self.clock.now()
            wake = self.book.written_at + s.heartbeat if self.book.leases else now + s.poll_max
            await self._nap(max(s.poll_min, min(wake - now, s.poll_max)), self._done)

    async def _heartbeat(self) -> None:
        """Write the record when a renewal is due, or promptly once it holds nothing more."""
        if self.book.leases and self.book.due(self.settings.heartbeat):
            await self.book.write()
            self._apply_cancels()  # requests learned with this write, if any
            await self.limiter.renew()  # concurrency slots live as long as leases
        elif self.book.dirty and self.book.etag is not None:
            await self.book.write()  # say promptly that we hold nothing any more
        lapses = self.book.lapses
        if lapses != self._lapses_checked:  # a write (this one or an announce) lapsed
            await self._check_leases()
            self._lapses_checked = lapses

    async def _maintenance(self) -> None:
        """Promote due delayed tasks, recover dead workers, flush deletes, re-read the
        queue's settings (the heartbeat has a loop of its own: ``_heartbeats``). Each step
        fails alone (an outage of one step, a bad object, a bug) and backs off alone."""
        s = self.settings
        t = self.clock.now()
        timers = {
            "settings": t + s.queue_settings_refresh * random.uniform(0.8, 1.2),
            "promote": 0.0, "sweep": 0.0,
            "idem": t + s.idempotency_sweep_interval * random.uniform(0.1, 1.0),
            "deps": t + s.dependency_sweep_interval * random.uniform(0.1, 1.0),
            "aging": t + s.aging.interval * random.uniform(0.1, 1.0) if s.aging.enabled else float("inf"),
            "retention": t + s.retention_interval * random.uniform(0.1, 1.0),
            "idem_scan": t + s.idempotency_sweep_interval * 12 * random.uniform(0.1, 1.0),
        }
        cursors: dict[str, str | None] = {"idem": None, "deps": None}
        # workers started together only see each other once their records exist: look
        # again soon after our first record write, so the listing is split early
        startup_sweeps: list[float] = [0.0, 0.25, 0.5, 1.0]  # 0.0: waiting for our first record

        async def settings() -> None:
            nonlocal s
            old = self.settings.aging
            await self._apply_queue_settings()
            if old != self.settings.aging:  # switched on or off, or a new interval
                timers["aging"] = (self.clock.now() + self.settings.aging.interval * random.uniform(0.1, 1.0)
                                   if self.settings.aging.enabled else float("inf"))
            s = self.settings

        promote_poll = s.poll_min
        rotation, turn_due = Rotation(), math.inf

        async def promote() -> None:
            # its own idle backoff, not the feed's: a busy worker lists delayed/ no more
            # often than an idle one; a due time seen in the listing, or one this worker
            # wrote itself (a retry, a rate-limit delay), wakes it on time
            # (a spread queue: one shard a pass, in turn, the next at once while a turn
            # finds nothing to promote; the earliest due time seen in the turn wakes it)
            nonlocal promote_poll, turn_due
            now = self.clock.now()
            shards = shard_count(self.store.storage)
            only = [rotation.take(shards)] if shards > 1 else None
            promotion = await promote_due(self.store, now, shards=only)
            busy = bool(promotion.promoted or promotion.more)
            if promotion.next_due is not None:
                turn_due = min(turn_due, promotion.next_due)
            if only is not None and not busy and not rotation.found(False, shards):
                timers["promote"] = now  # the next shard now
                return
            if busy:
                promote_poll = s.poll_min
                if only is not None:
                    rotation.found(True, shards)
            else:
                promote_poll = min(s.poll_max, promote_poll * 2)
            timers["promote"] = min(now + promote_poll * random.uniform(0.8, 1.2), turn_due)
            turn_due = math.inf
            if promotion.promoted:
                self.feed.wake(now)

        async def sweep() -> None:
            await self._sweep()
            if startup_sweeps and startup_sweeps[0]:
                timers["sweep"] = self.clock.now() + startup_sweeps.pop(0)

        async def deps() -> None:
            cursors["deps"] = await self.queue.dependencies.sweep(cursors["deps"])

        async def idem() -> None:
            # the expiry index: cost per expired record; a full page means more are due
            if await sweep_expiry_index(self.queue) >= 1000:
                timers["idem"] = self.clock.now() + s.poll_max
            if self.clock.now() >= timers["idem_scan"]:  # records written before the index
                timers["idem_scan"] = self.clock.now() + s.idempotency_sweep_interval * 12 * random.uniform(0.5, 1.5)
                cursors["idem"] = await sweep_expired(self.queue, cursors["idem"])

        async def aging() -> None:  # each pass goes on where this worker's last one stopped
            done = await age_ready(self.store, self.queue.plugins, s.aging, self.clock.now(), cursor=cursors.get("aging"))
            cursors["aging"] = done.cursor
            self.stats["aged"] += done.moved

        async def retention() -> None:
            for status, n in (await apply_retention(self.queue)).items():
                self.stats[f"purged_{status}"] += n
                log.info("worker %s: deleted %d %s tasks past their retention", self.worker_id, n, status)

        async def flush() -> None:
            await self.packs.tick(self.clock.now())
            feed = self.feed
            if feed.trash and (not feed.buffer or self.clock.now() - feed.flushed_at >= 0.25):
                await feed.flush()

        while not self._done.is_set():
            now = self.clock.now()
            stopping = self._stopping.is_set()
            self._delayed_written.clear()
            if self.delayed_due is not None:  # this worker wrote a delayed marker
                timers["promote"] = min(timers["promote"], self.delayed_due)
                self.delayed_due = None
            if not stopping:
                if now >= timers["settings"]:
                    timers["settings"] = now + s.queue_settings_refresh * random.uniform(0.8, 1.2)
                    await self._step("reading the queue's settings", settings)
                if now >= timers["promote"]:
                    timers["promote"] = now + s.poll_max  # unless promote() says sooner
                    await self._step("promoting due delayed tasks", promote)
            if not stopping:
                if startup_sweeps and self.book.etag is not None and not startup_sweeps[0]:
                    startup_sweeps.pop(0)  # our record exists now: sweep soon, a few times
                    timers["sweep"] = min(timers["sweep"], now + startup_sweeps[0])
                if now >= timers["sweep"]:
                    timers["sweep"] = now + s.sweep_interval * random.uniform(0.5, 1.5)
                    await self._step("recovering the tasks of dead workers", sweep)
                if now >= timers["deps"]:
                    timers["deps"] = now + s.dependency_sweep_interval * random.uniform(0.5, 1.5)
                    await self._step("sweeping dependency edges", deps)
                if now >= timers["idem"]:
                    timers["idem"] = now + s.idempotency_sweep_interval * random.uniform(0.5, 1.5)
                    await self._step("expiring idempotency records", idem)
                if now >= timers["aging"] and s.aging.enabled:  # about one pass per interval on the queue
                    timers["aging"] = now + s.aging.interval * len(self.feed.peers | {self.worker_id}) * random.uniform(0.5, 1.5)
                    await self._step("aging waiting tasks", aging)
                if now >= timers["retention"]:  # about one pass per interval on the queue
                    timers["retention"] = now + s.retention_interval * len(self.feed.peers | {self.worker_id}) \
                        * random.uniform(0.5, 1.5)
                    await self._step("deleting tasks past their retention", retention)
            await self._step("deleting claimed markers", flush)
            self._check_outages()
            wake = min(timers["promote"], timers["sweep"], timers["aging"])
            if self.packs.busy:  # held packs' outcomes are written within FLUSH_AFTER
                wake = min(wake, now + FLUSH_AFTER)
            if stopping:
                wake = now + s.poll_max
            await self._nap(max(s.poll_min, min(wake - self.clock.now(), s.poll_max)),
                            self._done if stopping else self._stopping, self._delayed_written)

    async def _step(self, what: str, fn: Callable[[], Any]) -> None:
        """Run one housekeeping step; its failure is its own outage (backed off, said
        once per backoff step), never the end of housekeeping."""
        outage = self.outages[what]
        if outage.failing and self.clock.now() < outage.retry_at:
            return
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except CorruptObject:
            self.stats["bad_objects"] += 1  # reported (once) where it was read
            outage.ok()
        except QoError as exc:
            outage.failed(exc)
        except Exception as exc:  # our bug or a plugin's: loudly, once per outage
            if not outage.failing:
                log.exception("worker %s: %s failed", self.worker_id, what)
            outage.failed(exc)
        else:
            outage.ok()

    def _unexpected(self, what: str, exc: Exception, where: str) -> float:
        """An exception nothing handled (a bug, or a backend outside its contract raising
        AttributeError in a loop): its traceback once per outage, then the outage's
        backoff, and a drain ends once it has lasted ``storage_failure_limit``. Returns
        how long to wait."""
        outage = self.outages[what]
        if not outage.failing:
            log.exception("worker %s: error %s%s", self.worker_id, what, f" ({where})" if where else "")
        delay = outage.failed(exc)
        self._check_outages()
        return delay

    def _check_outages(self) -> None:
        """A worker draining the queue gives up once storage has failed for too long."""
        if not self._until_idle or self.fatal is not None:
            return
        worst = self.outages.longest()
        if worst is not None and worst.duration() >= self.settings.storage_failure_limit:
            self.fatal = StorageError(
                f"storage kept failing for {worst.duration():.0f} s while {worst.what} "
                f"({type(worst.last_error).__name__}: {worst.last_error}); stopping (storage_failure_limit="
                f"{self.settings.storage_failure_limit:g} s)", backend=self.queue.storage.name)
            log.error("worker %s: %s", self.worker_id, self.fatal)
            self.stop()

    async def _meet_peers(self) -> None:
        """Before the first listing: write our record, wait a moment, sweep. Workers
        started together then split the listing from their first claim on, instead of
        all taking its head until their records meet (one PUT, one LIST and a GET per
        live worker; ~0.1 s). A failure here only delays the split."""
        try:
            await self.book.write()
            await asyncio.sleep(random.uniform(0.05, 0.15))  # real time: peers write theirs meanwhile
            await self._sweep()
        except QoError as exc:
            log.debug("worker %s: meeting peers failed (the sweeps will): %s", self.worker_id, exc)

    async def _sweep(self):
        """Recover the tasks of dead workers; learn how many workers are alive."""
        def emitted(event: str, task: Task) -> None:
            if event == "failed":  # recovered, its attempts used up: a dead letter
                self.tasklog.failed(task, None, None)
            else:
                self.tasklog.recovered(task)
            emit(self.queue.plugins, event, task)

        report = await sweep(self.store, self.clock, self_id=self.worker_id, emit=emitted, on_end=self._release)
        self.feed.peers = set(report.alive)
        self.limiter.workers = len(self.feed.peers) + 1
        self.stats["recovered"] += len(report.recovered)
        return report

    async def _summaries(self) -> None:
        """Every ``log_summary_interval`` seconds: one summary line if anything started or
        ended meanwhile (silent while idle)."""
        while not self._stopping.is_set():
            await self._sleep(self.settings.log_summary_interval)
            self.tasklog.summary(len(self._running))

    async def _watch_idle(self) -> None:
        """Stop once nothing of ours is pending, delayed or running anywhere."""
        while not self._stopping.is_set():
            await self._sleep(max(self.settings.poll_min, min(self.feed.poll, 0.5)))
            if self._running or not self.feed.empty:
                continue
            try:
                if await self._queue_idle() and (self.idle_gate is None or await self.idle_gate(self)):
                    self.stop()
                    return
            except QoError as exc:
                log.warning("worker %s: idle check failed: %s", self.worker_id, exc)
            except Exception as exc:  # a backend breaking the contract: the drain must still end
                self._unexpected("checking whether the queue is idle", exc, "")

    async def _queue_idle(self) -> bool:
        """Nothing of ours anywhere. Checked in the order tasks move: a task leaves a
        worker's record only after its marker is written, its edges (blocked) only after
        its marker is written, and delayed/ only after its ready marker is written, so
        records, then edges, then delayed/, then ready/ misses none."""
        report = await self._sweep()
        if report.recovered:
            return False
        for record in report.alive.values():
            if any(self.handles(lease.get("type", "")) for lease in record["leases"].values()):
                return False
        if any(self.handles(t) for t in await self.queue.dependencies.blocked_types()):
            return False
        promotion = await promote_due(self.store, self.clock.now())
        if promotion.promoted or promotion.more or any(self.handles(t) for t in promotion.types):
            return False
        cursor: str | None = None
        while True:  # the whole index: others' markers may lie ahead of ours
            entries = await self.store.list(keys.ready_prefix(self.queue.name), start_after=cursor, limit=1000)
            for e in entries:
                m = keys.parse_marker(e.key)
                if not m or not self.handles(m.task_type) or m.key in self.feed.trash or m.key in self.feed.deleting:
                    continue  # not ours; or claimed by us, its delete pending (below)
                if m.key not in self.feed.skip:
                    return False
                try:  # a marker we skip may have become claimable since: look at its task
                    task, _ = await (self.store.packs.load(m.task_id) if m.is_pack else self.store.load(m.task_id))
                except QoError:
                    continue
                if task.status == PENDING and keys.ms(task.available_at) == keys.ms(m.due):
                    self.feed.skip.pop(m.key, None)
                    return False
            if len(entries) < 1000:
                break
            cursor = entries[-1].key
        # claimed markers not yet deleted: idle once they are (a delete that keeps
        # failing ends the drain with an error after storage_failure_limit)
        return not (self._running or self.feed.taken or self.feed.buffer or self.feed.trash or self.packs.busy)
