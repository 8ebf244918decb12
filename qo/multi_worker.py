"""One worker process, several queues: ``qo.Worker([emails, reports])``.

A ``MultiQueueWorker`` runs one ``Worker`` per queue (each with its own record, feed
and limits in its queue) under one concurrency budget, the ``SlotGate``: a slot that
has a candidate asks the gate before it claims, and a freed slot goes to the waiting
queue the order says:

- ``strict`` (the default): the first queue listed that is waiting, so a later queue
  runs only on slots the earlier ones leave free (no running task is preempted);
- weights (``weights=[3, 1]``): the waiting queue with the fewest running tasks per unit
  of weight, so under load the queues share the slots 3 : 1, and an idle queue's share
  goes to the others.

``run(until_idle=True)`` returns once every queue is idle in the same check.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
from typing import Any, Sequence

from .errors import InvalidInput
from .handlers import HandlerHost, Registry

__all__ = ["MultiQueueWorker", "SlotGate"]


class SlotGate:
    """A concurrency budget shared by the queues of one worker, granted by queue order
    (``weights=None``) or by weight."""

    def __init__(self, total: int, queues: int, weights: Sequence[int] | None = None):
        self.free = total
        self.running = [0] * queues
        self.weights = list(weights) if weights is not None else None
        self._waiting: list[collections.deque[asyncio.Future]] = [collections.deque() for _ in range(queues)]

    async def acquire(self, rank: int) -> None:
        """Wait for a slot for a task of queue ``rank`` (cancellable)."""
        if self.free > 0 and not any(self._waiting):
            self._grant(rank)
            return
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[rank].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as we were cancelled: give it back
                self.release(rank)
            else:
                with contextlib.suppress(ValueError):
                    self._waiting[rank].remove(future)
            raise

    def release(self, rank: int) -> None:
        self.running[rank] -= 1
        self.free += 1
        self._hand_over()

    def _grant(self, rank: int) -> None:
        self.free -= 1
        self.running[rank] += 1

    def _next(self) -> int | None:
        ready = [r for r, q in enumerate(self._waiting) if q]
        if not ready:
            return None
        if self.weights is None:
            return ready[0]
        return min(ready, key=lambda r: (self.running[r] / self.weights[r], r))

    def _hand_over(self) -> None:
        while self.free > 0:
            rank = self._next()
            if rank is None:
                return
            future = self._waiting[rank].popleft()
            if future.done():  # cancelled while waiting
                continue
            self._grant(rank)
            future.set_result(None)


def parse_queue_spec(text: str) -> tuple[str, int | None]:
    """``emails`` or ``emails:3`` (a weight, 1-1000) from ``qo worker --queue``."""
    name, sep, weight = text.partition(":")
    if not sep:
        return name, None
    if not weight.isdigit() or not 1 <= int(weight) <= 1000:
        raise InvalidInput("--queue", f"{text!r}: the weight after ':' must be an integer from 1 to 1000")
    return name, int(weight)


class MultiQueueWorker(HandlerHost):
    """Runs handlers for the due tasks of several queues under one concurrency budget
    (module docstring). Built by ``qo.Worker([q1, q2, ...], ...)``."""

    def __init__(self, queues: Sequence[Any], concurrency: int | None = None, *,
                 weights: Sequence[int] | None = None, settings: Any = None, worker_class: Any = None,
                 **overrides: Any):
        """``worker_class``: the single-queue worker to run per queue (``qo.Worker``, which
        builds this class and passes itself: this module does not import it)."""
        from .leases import new_worker_id
        from .queue import Queue

        if worker_class is None:
            raise InvalidInput("worker_class", "build it as qo.Worker([queue, ...])")

        queues = list(queues)
        if not queues or not all(isinstance(q, Queue) for q in queues):
            raise InvalidInput("queues", "must be a non-empty list of qo.Queue")
        names = [(q.name, id(q.storage)) for q in queues]
        if len(set(names)) != len(names):
            raise InvalidInput("queues", "lists the same queue twice")
        if weights is not None:
            weights = list(weights)
            if len(weights) != len(queues) or not all(
                    isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in weights):
                raise InvalidInput("weights", f"must be {len(queues)} integers >= 1, one per queue")
        self.queues = queues
        self.weights = weights
        overrides.setdefault("worker_id", getattr(settings, "worker_id", None) or new_worker_id())
        self.workers = [worker_class(q, concurrency, settings=settings, **overrides) for q in queues]
        self.settings = self.workers[0].settings
        self.worker_id = self.workers[0].worker_id
        self.registry = Registry()  # one set of handlers, shared by every queue's worker
        self.gate = SlotGate(self.settings.concurrency, len(queues), weights)
        for rank, w in enumerate(self.workers):
            w.registry = self.registry  # one set of handlers for every queue
            w.gate = (self.gate, rank)
            w.idle_gate = self._all_idle
            w.handle_signals = False  # the signals reach every queue's worker through us

    def __repr__(self) -> str:
        order = f"weights {self.weights}" if self.weights else "strict order"
        return f"<MultiQueueWorker {[q.name for q in self.queues]} ({order}), concurrency {self.settings.concurrency}>"

    # -- running ----------------------------------------------------------------------

    @property
    def stats(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for w in self.workers:
            total.update(w.stats)
        return total

    @property
    def forced(self) -> bool:
        return any(w.forced for w in self.workers)

    @property
    def fatal(self) -> Any:
        return next((w.fatal for w in self.workers if w.fatal is not None), None)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def force(self) -> None:
        for w in self.workers:
            w.force()

    async def _all_idle(self, asking: Any) -> bool:
        """Every queue idle in one check (asked by a queue's worker that found its own idle)."""
        for w in self.workers:
            if w is asking:
                continue
            if w._running or not w.feed.empty or not await w._queue_idle():
                return False
        self.stop()
        return True

    async def run(self, until_idle: bool = False) -> collections.Counter[str]:
        """Run every queue's worker until stopped (SIGTERM/SIGINT, :meth:`stop`) or, with
        ``until_idle``, until every queue is idle. Returns the counters summed."""
        if not self.registry.handlers:
            raise InvalidInput("handlers", "this worker has no handlers registered")
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        async def one(w: Any) -> Any:
            try:
                return await w.run(until_idle)
            except BaseException:
                self.stop()  # one queue's worker failed (storage gone for too long): all stop
                raise

        try:
            results = await asyncio.gather(*(one(w) for w in self.workers), return_exceptions=True)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return self.stats

    def _on_signal(self, sig: signal.Signals) -> None:
        for w in self.workers:
            w._on_signal(sig)
