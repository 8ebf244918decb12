"""A rate limit and its bucket's state (``limits/state/{id}.json``): the data, read and checked.

Below both the limit definitions (``qo/limits.py``: ``queue.limits``, whose ``list``
shows the current tokens) and the limiter that changes the state (``qo/ratelimit.py``).
"""

from __future__ import annotations

from typing import Any

import attrs

from . import stored
from .errors import CorruptObject, NotFound
from .model import dumps


BACKPRESSURE = ("delay", "wait", "skip")


@attrs.frozen
class Limit:
    scope: str
    rate: float | None = None  # starts per `per` seconds
    per: float = 1.0
    burst: float | None = None  # default: max(1, rate)
    concurrency: int | None = None
    backpressure: str = "delay"

    @property
    def per_second(self) -> float | None:
        return None if self.rate is None else self.rate / self.per

    @property
    def capacity(self) -> float:
        return float(self.burst if self.burst is not None else max(1.0, self.rate or 1.0))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


#: a bucket's time further ahead of a reader's clock than this: that clock was set back
#: (by more than any skew qo tolerates between workers): the bucket goes on from the
#: reader's time, with its tokens, rather than granting nothing until the clock is back
REBASE_SECONDS = 300.0


@attrs.define
class BucketState:
    tokens: float
    at: float
    running: dict[str, float] = attrs.field(factory=dict)  # task id -> lease expiry
    etag: str | None = None
    #: ``refill`` moved the bucket's time back to the reader's: worth a write even when
    #: nothing is taken (else every read would start the refill afresh)
    rebased: bool = attrs.field(default=False, eq=False)

    def refill(self, limit: Limit, now: float) -> None:
        """Tokens for the time since ``at``; the bucket's time only moves forward, so
        clocks that disagree (by up to ``REBASE_SECONDS``) cannot refill it twice."""
        if self.at > now + REBASE_SECONDS:  # this clock was set back: go on from it, tokens kept
            shift = self.at - now
            self.running = {t: exp - shift for t, exp in self.running.items()}
            self.at, self.rebased = now, True
        if limit.per_second is not None:
            self.tokens = min(limit.capacity, self.tokens + max(0.0, now - self.at) * limit.per_second)
        self.at = max(self.at, now)

    def live_running(self, now: float) -> dict[str, float]:
        return {t: exp for t, exp in self.running.items() if exp > now}

    def to_json(self) -> bytes:
        return dumps({"tokens": self.tokens, "at": self.at, "running": self.running})


async def read_state(queue: Any, key: str, limit: Limit, now: float) -> BucketState:
    """The bucket as stored (a bucket never written is full), refilled to ``now``."""
    store = queue.store
    try:
        blob = await store.backoff.call(lambda: store.storage.get(key))
    except NotFound:
        state = BucketState(limit.capacity, now)
    else:
        try:
            state = parse_state(blob.data, key, blob.etag, backend=store.storage.name)
            if state.tokens < 0 or any(e > max(now, state.at) + 7 * 86400 for e in state.running.values()):
                raise CorruptObject(key, "tokens below zero, or leases far in the future", backend=store.storage.name)
        except CorruptObject as exc:
            # the state is derived and short-lived: start it afresh (a full bucket, the
            # state of a limit never used), replacing the bad version by CAS
            store.bad.report(exc, "replaced by a full bucket")
            state = BucketState(limit.capacity, now, {}, blob.etag)
    state.refill(limit, now)
    return state


_STATE_CHECKS = {"tokens": stored.is_number, "at": stored.is_number, "running": stored.is_dict}


def parse_state(data: bytes, key: str, etag: str, *, backend: str = "") -> BucketState:
    """A bucket's state as stored at ``key``; ``CorruptObject`` if unusable."""
    d = stored.check_fields(stored.decode(data, key, backend=backend), key, _STATE_CHECKS,
                            required=("tokens", "at"), backend=backend)
    running = d.get("running") or {}
    if not all(isinstance(k, str) and stored.is_number(v) for k, v in running.items()):
        raise CorruptObject(key, "field 'running' is not a map of entries to expiry times", backend=backend)
    return BucketState(float(d["tokens"]), float(d["at"]), dict(running), etag)
