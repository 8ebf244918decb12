"""Storage wrappers for measuring: count requests by operation, or add latency.

``CountingStorage`` counts the calls the engine makes to its backend, so it works on
every backend (no server-side counter needed). Each call is one request, by operation:

    GET           get()
    PUT           put() without a condition (markers)
    PUT_COND      put(if_match=...) or put(if_none_match=True) (task and record writes)
    LIST          list(): one per page of ``page_size`` keys when the backend pages (S3)
    DELETE        delete()
    DELETE_BATCH  delete_many(): one per call of up to 1000 keys (``qo.storage.delete_many``
                  calls it in chunks of 1000); only present when the backend has it

A failed call is still a request (it is billed and it took a round trip): it is counted
under its operation and, in addition, under ``failures()`` as ``"OP:ErrorType"``.

Use it through ``qo.connect(url, wrap_storage=CountingStorage)``; the wrapper is then
``queue.storage``. ``LatencyStorage(inner, seconds)`` sleeps before each call, a crude
stand-in for a remote store's round trip on the local backend.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import Counter
from typing import Any

from .storage import Blob, Entry, Storage

__all__ = ["OPS", "CountingStorage", "LatencyStorage"]

#: Every operation CountingStorage counts, in a stable order for reports.
OPS = ("GET", "PUT", "PUT_COND", "LIST", "DELETE", "DELETE_BATCH")


class _Wrapper:
    """Forwards ``name``, ``clock_offset`` and ``delete_many`` (only if the inner has it).

    Other attributes are deliberately not forwarded: a method the wrapper does not know
    would bypass it silently.
    """

    def __init__(self, inner: Storage):
        self.inner = inner
        if callable(getattr(inner, "delete_many", None)):
            # an instance attribute, so ``getattr(storage, "delete_many", None)`` in
            # qo.storage.delete_many finds it exactly when the backend has it
            self.delete_many = self._delete_many

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def clock_offset(self) -> float:
        return float(getattr(self.inner, "clock_offset", 0.0) or 0.0)

    async def _delete_many(self, keys: list[str]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class CountingStorage(_Wrapper):
    """A Storage that counts every request it passes to ``inner``, by operation."""

    def __init__(self, inner: Storage):
        super().__init__(inner)
        self._lock = threading.Lock()  # the local backend may be driven from threads
        self._counts: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"CountingStorage({self.inner!r})"

    # -- the numbers --------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Requests so far by operation (a copy; only operations seen are present)."""
        with self._lock:
            return dict(self._counts)

    def failures(self) -> dict[str, int]:
        """Failed requests so far by ``"OP:ErrorType"`` (a copy)."""
        with self._lock:
            return dict(self._failures)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def snapshot(self) -> dict[str, Any]:
        """Counts (every operation in :data:`OPS`, zeros included), failures and total."""
        with self._lock:
            counts = {op: self._counts.get(op, 0) for op in OPS}
            counts.update({op: n for op, n in self._counts.items() if op not in counts})
            return {"counts": counts, "failures": dict(self._failures), "total": sum(counts.values())}

    def reset(self) -> None:
        """Forget everything counted so far."""
        with self._lock:
            self._counts.clear()
            self._failures.clear()

    def _add(self, op: str, n: int = 1) -> None:
        with self._lock:
            self._counts[op] += n

    def _failed(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self._failures[f"{op}:{type(exc).__name__}"] += 1

    # -- the contract -------------------------------------------------------------

    async def get(self, key: str) -> Blob:
        self._add("GET")
        try:
            return await self.inner.get(key)
        except Exception as exc:
            self._failed("GET", exc)
            raise

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        op = "PUT_COND" if (if_match is not None or if_none_match) else "PUT"
        self._add(op)
        try:
            return await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)
        except Exception as exc:
            self._failed(op, exc)
            raise

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        self._add("DELETE")
        try:
            await self.inner.delete(key, if_match=if_match)
        except Exception as exc:
            self._failed("DELETE", exc)
            raise

    async def _delete_many(self, keys: list[str]) -> None:
        self._add("DELETE_BATCH")
        try:
            await self.inner.delete_many(keys)  # type: ignore[attr-defined]
        except Exception as exc:
            self._failed("DELETE_BATCH", exc)
            raise

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        try:
            out = await self.inner.list(prefix, start_after=start_after, limit=limit)
        except BaseException as exc:  # a cancelled LIST was sent too (as qo.meter counts it)
            self._add("LIST")
            if isinstance(exc, Exception):
                self._failed("LIST", exc)
            raise
        self._add("LIST", self._pages(len(out)))
        return out

    def _pages(self, found: int) -> int:
        """Requests one list() call made: the backend pages by ``page_size`` (S3: 1000)."""
        page = getattr(self.inner, "page_size", None)
        if not isinstance(page, int) or page <= 0:
            return 1
        return max(1, math.ceil(found / page))

    async def close(self) -> None:
        await self.inner.close()


class LatencyStorage(_Wrapper):
    """A Storage that waits ``seconds`` before passing each call to ``inner``."""

    def __init__(self, inner: Storage, seconds: float):
        super().__init__(inner)
        seconds = float(seconds)
        if not seconds >= 0:
            raise ValueError("seconds must be >= 0")
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"LatencyStorage({self.inner!r}, {self.seconds})"

    async def _wait(self) -> None:
        if self.seconds:
            await asyncio.sleep(self.seconds)

    async def get(self, key: str) -> Blob:
        await self._wait()
        return await self.inner.get(key)

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        await self._wait()
        return await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        await self._wait()
        await self.inner.delete(key, if_match=if_match)

    async def _delete_many(self, keys: list[str]) -> None:
        await self._wait()
        await self.inner.delete_many(keys)  # type: ignore[attr-defined]

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        await self._wait()
        return await self.inner.list(prefix, start_after=start_after, limit=limit)

    async def close(self) -> None:
        await self.inner.close()
