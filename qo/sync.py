"""A synchronous face of :class:`qo.Queue` for Flask, Django, scripts and notebooks.

``qo.connect_sync(url, queue=...)`` opens the queue on an event loop of its own, run by
one daemon thread; each method hands its coroutine to that loop and waits for the
result. So a sync call makes exactly the requests the async call makes, every storage
client stays on the loop that created it, and any number of threads may call at once
(their calls run concurrently on the loop). The hand-off costs tens of microseconds,
not the ~160 ms of an ``asyncio.run`` per call (which also opens a new connection).

A SyncQueue closes with ``close()``, as a context manager, or at interpreter exit.
Called from a thread that runs an event loop, it refuses (``RuntimeError``): blocking
that loop on storage would stall everything else on it; use ``await qo.connect(...)``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import weakref
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterable, Iterator, Sequence, TypeVar

from .model import Task
from .queue import Queue, connect

__all__ = ["SyncQueue", "close_shared", "connect_sync", "shared_queue"]

T = TypeVar("T")


def _refuse_in_event_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"qo.SyncQueue.{what}() was called from a running event loop, which it would block: "
        f"in async code use the async API (queue = await qo.connect(...); await queue.{what}(...))")


class _LoopThread:
    """An event loop run by a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="qo-sync-loop", daemon=True)
        self._thread.start()
        self.closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, what: str, make: Callable[[], Awaitable[T]], *, in_loop_ok: bool = False) -> T:
        if not in_loop_ok:
            _refuse_in_event_loop(what)
        if self.closed:
            raise RuntimeError(f"qo.SyncQueue.{what}(): the queue is closed")
        future = asyncio.run_coroutine_threadsafe(_await(make), self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt while waiting: do not leave it running
            raise

    def submit(self, make: Callable[[], Awaitable[T]]) -> "asyncio.Future[T]":
        """Run on this loop from another loop: an awaitable there (no thread blocked)."""
        if self.closed:
            raise RuntimeError("qo: the shared queue is closed")
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_await(make), self.loop))

    def stop(self, last: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Run ``last`` (closing the queue), then stop the loop and join its thread."""
        if self.closed:
            return
        self.closed = True
        if last is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(_await(last), self.loop).result(timeout=10)
            except Exception:  # closing is best effort: the process may be exiting
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


class _SyncFacade:
    """The sync face of a sub-API (``queue.schedules``, ``queue.limits``, ``queue.settings``):
    every coroutine method becomes a blocking one of the same name; other attributes
    pass through."""

    def __init__(self, runner: _LoopThread, target: Any, name: str):
        self._runner = runner
        self._target = target
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if not asyncio.iscoroutinefunction(value):
            return value
        what = f"{self._name}.{attr}"

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._runner.call(what, lambda: value(*args, **kwargs))

        call.__name__ = attr
        call.__doc__ = value.__doc__
        return call

    def __repr__(self) -> str:
        return f"<sync {self._target!r}>"


class SyncQueue:
    """:class:`qo.Queue` with blocking methods of the same names, arguments, results and
    errors. Thread-safe. ``async_queue`` is the Queue underneath (on its own loop)."""

    def __init__(self, runner: _LoopThread, queue: Queue):
        self._runner = runner
        self.async_queue = queue
        self._finalizer = weakref.finalize(self, runner.stop, queue.close)

    # -- what it is -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.async_queue.name

    @property
    def url(self) -> str:
        return self.async_queue.url

    @property
    def clock(self) -> Any:
        return self.async_queue.clock

    @property
    def storage(self) -> Any:
        return self.async_queue.storage

    @property
    def schedules(self) -> Any:
        """``queue.schedules`` with blocking methods (add, get, list, remove, pause, resume, trigger)."""
        return _SyncFacade(self._runner, self.async_queue.schedules, "schedules")

    @property
    def limits(self) -> Any:
        """``queue.limits`` with blocking methods (set, remove, definitions, list)."""
        return _SyncFacade(self._runner, self.async_queue.limits, "limits")

    @property
    def settings(self) -> Any:
        """``queue.settings`` with blocking methods (get, set, unset, task_defaults)."""
        return _SyncFacade(self._runner, self.async_queue.settings, "settings")

    def __repr__(self) -> str:
        return f"<SyncQueue {self.name!r} on {self.async_queue.storage!r}>"

    def _call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        return self._runner.call(what, make)

    # -- submit ---------------------------------------------------------------------

    def build_task(self, task_type: str, input: Any = None, **options: Any) -> Task:
        """See :meth:`qo.Queue.build_task` (writes nothing)."""
        return self.async_queue.build_task(task_type, input, **options)

    def submit(self, task_type: str, input: Any = None, **options: Any) -> Task:
        """See :meth:`qo.Queue.submit`."""
        return self._call("submit", lambda: self.async_queue.submit(task_type, input, **options))

    def submit_many(self, items: Iterable[Sequence[Any]], *, concurrency: int = 32,
                    progress: Callable[[int, int], None] | None = None, bulk: bool = True) -> list[Task]:
        """See :meth:`qo.Queue.submit_many` (``progress`` is called on the queue's loop thread)."""
        items = list(items) if not isinstance(items, (str, bytes, dict)) else items
        return self._call("submit_many", lambda: self.async_queue.submit_many(
            items, concurrency=concurrency, progress=progress, bulk=bulk))

    def submit_graph(self, nodes: dict[str, dict[str, Any]]) -> dict[str, Task]:
        """See :meth:`qo.Queue.submit_graph`."""
        return self._call("submit_graph", lambda: self.async_queue.submit_graph(nodes))

    # -- inspect --------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        """See :meth:`qo.Queue.get`."""
        return self._call("get", lambda: self.async_queue.get(task_id))

    def payload(self, task: Task, which: str = "output") -> Any:
        """See :meth:`qo.Queue.payload`."""
        return self._call("payload", lambda: self.async_queue.payload(task, which))

    def wait(self, task_id: str, timeout: float | None = 30.0, *, poll: float = 0.05) -> Task:
        """See :meth:`qo.Queue.wait`."""
        return self._call("wait", lambda: self.async_queue.wait(task_id, timeout, poll=poll))

    def list(self, status: str | None = None, task_type: str | None = None, limit: int | None = 100, *,
             newest_first: bool = False, since: datetime | dt.timedelta | float | None = None) -> list[Task]:
        """See :meth:`qo.Queue.list`: the tasks as a list (at most ``limit``, 100 by
        default). For a listing too long to hold, :meth:`iterate` yields them."""
        async def collect() -> list[Task]:
            return [t async for t in self.async_queue.list(status, task_type, limit, newest_first=newest_first,
                                                           since=since)]

        return self._call("list", collect)

    def iterate(self, status: str | None = None, task_type: str | None = None, limit: int | None = None, *,
                newest_first: bool = False, since: datetime | dt.timedelta | float | None = None) -> Iterator[Task]:
        """:meth:`qo.Queue.list` as a plain iterator (no limit by default): tasks are read
        as it is advanced. Arguments are checked at the call, before anything is read."""
        agen = self.async_queue.list(status, task_type, limit, newest_first=newest_first, since=since)
        first = self._call("iterate", lambda: _next_or_stop(agen))  # checks the arguments now

        def rows() -> Iterator[Task]:
            item = first
            try:
                while item is not _DONE:
                    yield item  # type: ignore[misc]
                    item = self._call("iterate", lambda: _next_or_stop(agen))
            finally:
                if not self._runner.closed:
                    self._call("iterate", agen.aclose)

        return rows()

    def page(self, status: str | None = None, task_type: str | None = None,
             since: datetime | dt.timedelta | float | None = None, *, after: str | None = None,
             limit: int = 50) -> Any:
        """See :meth:`qo.Queue.page`: one ``qo.TaskPage``, newest first, with a cursor."""
        return self._call("page", lambda: self.async_queue.page(status, task_type, since, after=after, limit=limit))

    def ended_times(self, status: str = "failed",
                    since: datetime | dt.timedelta | float | None = None) -> list[tuple[float, str, str]]:
        """See :meth:`qo.Queue.ended_times`."""
        return self._call("ended_times", lambda: self.async_queue.ended_times(status, since))

    def dependents(self, task_id: str) -> list[tuple[str, str]]:
        """See :meth:`qo.Queue.dependents`."""
        return self._call("dependents", lambda: self.async_queue.dependents(task_id))

    def effective_priority(self, task: Task) -> int:
        """See :meth:`qo.Queue.effective_priority` (no request)."""
        return self.async_queue.effective_priority(task)

    def stats(self) -> dict[str, Any]:
        """See :meth:`qo.Queue.stats`."""
        return self._call("stats", self.async_queue.stats)

    # -- change ---------------------------------------------------------------------

    def cancel(self, task_id: str, *, terminate: bool = False) -> Task:
        """See :meth:`qo.Queue.cancel`."""
        return self._call("cancel", lambda: self.async_queue.cancel(task_id, terminate=terminate))

    def retry(self, task_id: str) -> Task:
        """See :meth:`qo.Queue.retry`."""
        return self._call("retry", lambda: self.async_queue.retry(task_id))

    def retry_many(self, status: str = "failed", task_type: str | None = None,
                   since: datetime | dt.timedelta | float | None = None, *,
                   progress: Callable[[int, int], Any] | None = None) -> int:
        """See :meth:`qo.Queue.retry_many`."""
        return self._call("retry_many", lambda: self.async_queue.retry_many(status, task_type, since,
                                                                            progress=progress))

    def cancel_many(self, status: str = "pending", task_type: str | None = None,
                    since: datetime | dt.timedelta | float | None = None, *,
                    progress: Callable[[int, int], Any] | None = None) -> int:
        """See :meth:`qo.Queue.cancel_many`."""
        return self._call("cancel_many", lambda: self.async_queue.cancel_many(status, task_type, since,
                                                                              progress=progress))

    def purge(self, status: str, older_than: dt.timedelta | float, task_type: str | None = None, *,
              dry_run: bool = False, progress: Callable[[int, int], None] | None = None) -> int:
        """See :meth:`qo.Queue.purge`."""
        return self._call("purge", lambda: self.async_queue.purge(status, older_than, task_type,
                                                                  dry_run=dry_run, progress=progress))

    # -- lifecycle ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._runner.closed

    def close(self) -> None:
        """Close the storage client and stop the loop thread (idempotent)."""
        _refuse_in_event_loop("close")
        self._finalizer()

    def __enter__(self) -> "SyncQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_DONE = object()


async def _next_or_stop(agen: Any) -> Any:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _DONE


def connect_sync(url: str | None = None, queue: str | None = None, **options: Any) -> SyncQueue:
    """Open ``queue`` at ``url`` (defaults as :func:`qo.connect`) for blocking use.

    ``options`` are :func:`qo.connect`'s keyword arguments (``options``, ``plugins``,
    ``clock``, ``wrap_storage``). Errors are :func:`qo.connect`'s, raised here."""
    _refuse_in_event_loop("connect_sync")
    return _open(url, queue, options)


def _open(url: str | None, queue: str | None, options: dict[str, Any]) -> SyncQueue:
    runner = _LoopThread()
    try:
        # connecting makes no request (it builds the client), so a caller on an event
        # loop (an async ``@qo.task`` submit opening the shared queue) is not held up
        q = runner.call("connect_sync", lambda: connect(url, queue=queue, **options), in_loop_ok=True)
    except BaseException:
        runner.stop()
        raise
    return SyncQueue(runner, q)


_shared: dict[tuple[str | None, str | None], SyncQueue] = {}
_shared_lock = threading.Lock()


def shared_queue(url: str | None = None, queue: str | None = None) -> SyncQueue:
    """One SyncQueue per (url, queue) for the whole process, opened on first use and
    closed at exit: what ``@qo.task`` functions submit through when given no queue."""
    key = (url, queue)
    with _shared_lock:
        q = _shared.get(key)
        if q is None or q.closed:
            q = _shared[key] = _open(url, queue, {})
        return q


def close_shared() -> None:
    """Close every queue :func:`shared_queue` opened (they also close at exit): for an
    app's shutdown hook, or a test that changes ``QO_URL``."""
    with _shared_lock:
        queues = list(_shared.values())
        _shared.clear()
    for q in queues:
        q.close()
