"""Fault injection: a Storage wrapper that makes a healthy backend misbehave on purpose.

``FaultyStorage(inner, seed=..., error_rate=..., throttle_rate=..., latency=...,
landed_error_rate=..., lost_response_rate=..., ops=...)`` injects, per call:

- **latency**: ``latency`` seconds before the call; a ``(low, high)`` pair draws
  uniformly from that range (jitter);
- **transient errors** (``error_rate``): ``StorageUnavailable`` raised *before* the
  call reaches the backend: nothing changed;
- **throttles** (``throttle_rate``): ``Throttled`` (the store said "slow down": S3's
  ``503 SlowDown``) raised before the call: nothing changed;
- **errors after the write landed** (``landed_error_rate``, writes only: ``put``,
  ``delete``, ``delete_many``): the backend performed the call, then
  ``StorageUnavailable`` is raised: the client sees a failure, the object changed;
- **lost responses to conditional writes** (``lost_response_rate``: ``put`` with
  ``if_match`` or ``if_none_match``): the write succeeded, its response is lost
  (``StorageUnavailable``). A conditional write that failed its precondition is
  reported as such.

``ops`` restricts injection to some operations (``get``, ``put``, ``delete``,
``delete_many``, ``list``; ``put_cond`` / ``put_plain`` narrow ``put``). With a
``seed`` the sequence of decisions is deterministic (for one sequence of calls).
``injected()`` counts what was injected, by kind and by ``kind:op``. Set
``enabled = False`` to pass everything through untouched.

Use it with ``qo.connect(url, wrap_storage=lambda s: FaultyStorage(s, error_rate=0.05))``.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from typing import Iterable

from ..counting import _Wrapper
from ..errors import StorageUnavailable, Throttled
from ..storage import Blob, Entry, Storage

__all__ = ["FaultyStorage", "FAULT_OPS", "KINDS"]

FAULT_OPS = frozenset({"get", "put", "put_cond", "put_plain", "delete", "delete_many", "list"})
#: the kinds of injected fault, as counted by ``injected()``
KINDS = ("error", "throttle", "landed_error", "lost_response", "latency")


def _rate(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return value


class FaultyStorage(_Wrapper):
    """A Storage that injects transient errors, latency, landed errors and lost responses."""

    def __init__(
        self,
        inner: Storage,
        *,
        seed: int | None = None,
        error_rate: float = 0.0,
        throttle_rate: float = 0.0,
        latency: float | tuple[float, float] = 0.0,
        landed_error_rate: float = 0.0,
        lost_response_rate: float = 0.0,
        ops: Iterable[str] | None = None,
    ):
        super().__init__(inner)
        self.error_rate = _rate("error_rate", error_rate)
        self.throttle_rate = _rate("throttle_rate", throttle_rate)
        if self.error_rate + self.throttle_rate > 1.0:
            raise ValueError("error_rate + throttle_rate must be at most 1")
        self.landed_error_rate = _rate("landed_error_rate", landed_error_rate)
        self.lost_response_rate = _rate("lost_response_rate", lost_response_rate)
        if isinstance(latency, (tuple, list)):
            low, high = (float(x) for x in latency)
        else:
            low = high = float(latency)
        if not 0 <= low <= high:
            raise ValueError(f"latency must be >= 0 (or a (low, high) pair), got {latency!r}")
        self.latency = (low, high)
        if ops is not None:
            ops = frozenset(str(o).lower() for o in ops)
            unknown = sorted(ops - FAULT_OPS)
            if unknown:
                raise ValueError(f"unknown operation(s) {unknown} (known: {sorted(FAULT_OPS)})")
        self.ops = ops
        self.enabled = True
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return (f"FaultyStorage({self.inner!r}, error_rate={self.error_rate}, "
                f"throttle_rate={self.throttle_rate}, latency={self.latency}, "
                f"landed_error_rate={self.landed_error_rate}, lost_response_rate={self.lost_response_rate})")

    # -- bookkeeping ------------------------------------------------------------------

    def injected(self) -> dict[str, int]:
        """What was injected so far: every kind in :data:`KINDS` (zeros included), plus
        ``"kind:op"`` for the kinds seen."""
        with self._lock:
            out = {k: self._counts.get(k, 0) for k in KINDS}
            out.update({k: n for k, n in self._counts.items() if k not in out})
            return out

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def _applies(self, op: str, sub: str | None = None) -> bool:
        if not self.enabled:
            return False
        return self.ops is None or op in self.ops or (sub is not None and sub in self.ops)

    def _draw(self) -> tuple[float, float, float, float]:
        """Four numbers per call, always, so a seed gives one sequence of decisions."""
        with self._lock:
            r = self._rng
            return r.random(), r.random(), r.random(), r.uniform(*self.latency)

    def _count(self, kind: str, op: str) -> None:
        with self._lock:
            self._counts[kind] += 1
            self._counts[f"{kind}:{op}"] += 1

    def _fail(self, kind: str, op: str, key: str | None, when: str) -> StorageUnavailable:
        self._count(kind, op)
        return StorageUnavailable(f"injected fault ({kind}, {when})", backend=self.name, key=key)

    async def _before(self, op: str, key: str | None, sub: str | None = None) -> tuple[float, float] | None:
        """Latency and a transient error before the call; returns the draws for after it."""
        if not self._applies(op, sub):
            return None
        err, landed, lost, delay = self._draw()
        if delay > 0:
            self._count("latency", op)
            await asyncio.sleep(delay)
        if err < self.error_rate:
            raise self._fail("error", op, key, "before the call")
        if err < self.error_rate + self.throttle_rate:  # the same draw: seeds keep their sequence
            self._count("throttle", op)
            raise Throttled("injected fault (throttle, before the call): slow down", backend=self.name, key=key)
        return landed, lost

    # -- the contract -------------------------------------------------------------------

    async def get(self, key: str) -> Blob:
        await self._before("get", key)
        return await self.inner.get(key)

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        await self._before("list", prefix)
        return await self.inner.list(prefix, start_after=start_after, limit=limit)

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        conditional = if_match is not None or if_none_match
        draws = await self._before("put", key, "put_cond" if conditional else "put_plain")
        etag = await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)
        if draws is not None:
            landed, lost = draws
            if landed < self.landed_error_rate:
                raise self._fail("landed_error", "put", key, "after the write landed")
            if conditional and lost < self.lost_response_rate:
                raise self._fail("lost_response", "put", key, "the conditional write landed")
        return etag

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        draws = await self._before("delete", key)
        await self.inner.delete(key, if_match=if_match)
        if draws is not None and draws[0] < self.landed_error_rate:
            raise self._fail("landed_error", "delete", key, "after the delete landed")

    async def _delete_many(self, keys: list[str]) -> None:
        draws = await self._before("delete_many", keys[0] if keys else None)
        await self.inner.delete_many(keys)  # type: ignore[attr-defined]
        if draws is not None and draws[0] < self.landed_error_rate:
            raise self._fail("landed_error", "delete_many", keys[0] if keys else None, "after the delete landed")

    async def close(self) -> None:
        await self.inner.close()
