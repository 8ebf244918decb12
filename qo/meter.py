"""Always-on request counts of a queue's storage, by operation: what a worker's record shows.

``meter_of(storage)`` installs a counter on the storage object itself: its ``get``,
``put``, ``delete``, ``list`` (and ``delete_many`` when it has one) are wrapped, on the
instance, by functions that add one to a dict before calling the original. The object
stays the same object (its type, its other attributes, a ``CountingStorage`` or fault
injector given to ``qo.connect(wrap_storage=...)``), and no request is added. The
operations are those of ``qo.counting.OPS``, counted as ``CountingStorage`` counts them:
a failed request counts, a ``list()`` counts one request per page of the backend's
``page_size``.

Queues opened on the same storage object share its meter (the counts are the
storage's). ``RequestRates`` turns the counts into the ``requests`` (since a start) and
``requests_per_minute`` (over about the last minute, from the samples taken at each
heartbeat) of a worker's record (qo/leases.py).
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Any, Callable

from .counting import OPS

__all__ = ["RequestMeter", "RequestRates", "meter_of"]

#: the window of ``requests_per_minute``, seconds
WINDOW = 60.0


class RequestMeter:
    """Requests so far by operation (thread-safe: the local backend may be driven from threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        #: False when the storage object could not be instrumented (counts stay empty)
        self.installed = False

    def add(self, op: str, n: int = 1) -> None:
        with self._lock:
            self._counts[op] += n

    def counts(self) -> dict[str, int]:
        """Every operation of ``OPS`` (zeros included), as of now."""
        with self._lock:
            return {op: self._counts.get(op, 0) for op in OPS}


def _page_size(storage: Any) -> int | None:
    """The keys per LIST request of the backend under any wrappers (``.inner`` chain)."""
    seen = 0
    while storage is not None and seen < 10:
        page = getattr(storage, "page_size", None)
        if isinstance(page, int) and page > 0:
            return page
        storage, seen = getattr(storage, "inner", None), seen + 1
    return None


def meter_of(storage: Any) -> RequestMeter:
    """The meter counting ``storage``'s requests, installed on first use."""
    meter = getattr(storage, "_qo_meter", None)
    if isinstance(meter, RequestMeter):
        return meter
    meter = RequestMeter()
    try:
        _install(storage, meter)
    except (AttributeError, TypeError):  # a frozen or slotted object: no counts, no harm
        return meter
    meter.installed = True
    return meter


def _install(storage: Any, meter: RequestMeter) -> None:
    add = meter.add
    wrapped: dict[str, Callable] = {}

    def counted(op: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            add(op)
            return await fn(*args, **kwargs)
        return call

    put = storage.put

    @functools.wraps(put)
    async def put_counted(*args: Any, **kwargs: Any) -> Any:
        add("PUT_COND" if kwargs.get("if_match") is not None or kwargs.get("if_none_match") else "PUT")
        return await put(*args, **kwargs)

    listing = storage.list

    @functools.wraps(listing)
    async def list_counted(*args: Any, **kwargs: Any) -> Any:
        try:
            out = await listing(*args, **kwargs)
        except BaseException:
            add("LIST")
            raise
        page = _page_size(storage)
        add("LIST", max(1, math.ceil(len(out) / page)) if page else 1)
        return out

    wrapped["get"] = counted("GET", storage.get)
    wrapped["put"] = put_counted
    wrapped["delete"] = counted("DELETE", storage.delete)
    wrapped["list"] = list_counted
    if callable(getattr(storage, "delete_many", None)):
        wrapped["delete_many"] = counted("DELETE_BATCH", storage.delete_many)
    storage._qo_meter = meter  # first: an object refusing attributes refuses here, untouched
    for name, fn in wrapped.items():
        setattr(storage, name, fn)


class RequestRates:
    """A worker's view of its queue's meter: counts since its start, and per minute."""

    def __init__(self, meter: RequestMeter, clock: Any):
        self.meter = meter
        self.clock = clock
        self.started_at = clock.now()
        self.baseline = meter.counts()
        #: (time, counts) taken at each record write; the oldest kept is >= WINDOW old
        self.samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque(
            [(self.started_at, self.baseline)])

    def sample(self) -> tuple[dict[str, int], dict[str, float]]:
        """``requests`` since the start and ``requests_per_minute`` over about the last
        minute (since the start while younger than that); records a sample."""
        now, counts = self.clock.now(), self.meter.counts()
        since = {op: counts[op] - self.baseline.get(op, 0) for op in counts}
        while len(self.samples) > 1 and now - self.samples[1][0] >= WINDOW:
            self.samples.popleft()  # keep exactly one sample at least WINDOW old
        t0, base = self.samples[0]
        elapsed = now - t0
        per_minute = {op: round(max(0, counts[op] - base.get(op, 0)) * 60.0 / elapsed, 1) if elapsed > 0 else 0.0
                      for op in counts}
        if now - self.samples[-1][0] >= 1.0:  # records are written often while claiming
            self.samples.append((now, counts))
        return since, per_minute
