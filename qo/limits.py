"""Rate and concurrency limits: definitions stored in the queue, ``queue.limits``.

A limit's scope is ``global``, ``task_type:<type>``, ``key:<key>`` or ``key:*`` (every
``rate_limit_key`` value gets its own bucket). A limit has a token-bucket rate
(``rate`` starts per ``per`` seconds, ``burst`` at once) and/or a ``concurrency`` cap
(at most N running at once), and a ``backpressure`` for a task that finds no token:
``delay`` (back to delayed until the next token, not an attempt), ``wait`` (the slot
waits, for short waits) or ``skip`` (the worker moves on and comes back).

    {q}/limits/defs/{scope id}.json     the definition
    {q}/limits/state/{bucket id}.json   tokens, their time, and the running set
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import attrs

from .errors import CorruptObject, InvalidInput, NotFound
from .keys import is_direct_child
from .limit_model import BACKPRESSURE, Limit, read_state
from .model import _short, check_task_type, dumps, is_utf8
from .stored import decode

def check_scope(scope: Any) -> str:
    if not isinstance(scope, str):
        raise InvalidInput("scope", "must be a string")
    if scope in ("global", "key:*"):
        return scope
    kind, sep, name = scope.partition(":")
    if sep and kind == "task_type":
        check_task_type(name, "scope")
        return scope
    if sep and kind == "key" and name and len(name) <= 256 and "\x00" not in name and is_utf8(name):
        return scope
    raise InvalidInput("scope", f"{_short(scope)} is not 'global', 'task_type:<type>', 'key:<key>' or 'key:*'")


def check_limit(scope: Any, rate: Any, per: Any, burst: Any, concurrency: Any, backpressure: Any) -> Limit:
    """Validate a definition, naming the bad field; nothing is written before this passes."""
    scope = check_scope(scope)
    if rate is None and concurrency is None:
        raise InvalidInput("rate", "give a rate, a concurrency, or both")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or not math.isfinite(rate) or rate <= 0):
        raise InvalidInput("rate", f"{_short(rate)} must be a positive number")
    if isinstance(per, bool) or not isinstance(per, (int, float)) or not math.isfinite(per) or per <= 0:
        raise InvalidInput("per", f"{_short(per)} must be a positive number of seconds")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, (int, float))
                              or not math.isfinite(burst) or burst < 1):
        raise InvalidInput("burst", f"{_short(burst)} must be a number >= 1")
    if burst is not None and rate is None:
        raise InvalidInput("burst", "needs a rate")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or not 1 <= concurrency <= 100000):
        raise InvalidInput("concurrency", f"{_short(concurrency)} must be an integer from 1")
    if backpressure not in BACKPRESSURE:
        raise InvalidInput("backpressure", f"{_short(backpressure)} is not one of {', '.join(BACKPRESSURE)}")
    return Limit(scope, None if rate is None else float(rate), float(per),
                 None if burst is None else float(burst), concurrency, backpressure)


def parse_limit(data: bytes, key: str, *, backend: str = "") -> Limit:
    """The definition stored at ``key``, checked as ``limits.set`` checks it (a negative
    or non-numeric rate, an unknown field); ``CorruptObject`` naming why."""
    d = decode(data, key, backend=backend)
    names = {f.name for f in attrs.fields(Limit)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CorruptObject(key, f"unknown field {_short(unknown[0])}", backend=backend)
    try:
        limit = check_limit(d.get("scope"), d.get("rate"), d.get("per", 1.0), d.get("burst"),
                            d.get("concurrency"), d.get("backpressure", "delay"))
    except InvalidInput as exc:
        raise CorruptObject(key, f"{exc.field}: {exc.message}", backend=backend) from None
    if key.rsplit("/", 1)[-1] != f"{scope_id(limit.scope)}.json":
        raise CorruptObject(key, f"holds the limit of {limit.scope!r}, not the one its key names", backend=backend)
    return limit


def check_rate_limit_key(value: Any, field: str = "rate_limit_key") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 256 or "\x00" in value or not is_utf8(value):
        raise InvalidInput(field, "must be a non-empty string of at most 256 characters without NUL or lone surrogates")
    return value


def scope_id(scope: str) -> str:
    """A key-safe name for a scope (keys are hashed: any string may be a rate-limit key)."""
    if scope == "global":
        return "global"
    if scope == "key:*":
        return "key-any"
    kind, _, name = scope.partition(":")
    if kind == "task_type":
        return f"type.{name}"
    return "key." + hashlib.sha256(name.encode()).hexdigest()[:40]


def bucket_id(limit: Limit, rate_limit_key: str | None) -> str:
    """The state object a task uses under ``limit`` (one per key for ``key:*``)."""
    if limit.scope == "key:*":
        return "keyed." + hashlib.sha256((rate_limit_key or "").encode()).hexdigest()[:40]
    return scope_id(limit.scope)


def defs_prefix(queue: str) -> str:
    return f"{queue}/limits/defs/"


def def_key(queue: str, scope: str) -> str:
    return f"{queue}/limits/defs/{scope_id(scope)}.json"


def state_prefix(queue: str) -> str:
    return f"{queue}/limits/state/"


def state_key(queue: str, bucket: str) -> str:
    return f"{queue}/limits/state/{bucket}.json"


class Limits:
    """``queue.limits``: define, list and remove limits."""

    def __init__(self, queue: Any):
        self.queue = queue

    async def set(self, scope: str, rate: float | None = None, per: float = 1.0, burst: float | None = None, *,
                  concurrency: int | None = None, backpressure: str = "delay") -> Limit:
        """Create or replace the limit of ``scope``; takes effect within a worker's refresh."""
        limit = check_limit(scope, rate, per, burst, concurrency, backpressure)
        store = self.queue.store
        data = dumps(limit.to_dict())
        await store.backoff.call(lambda: store.storage.put(def_key(self.queue.name, limit.scope), data))
        return limit

    async def remove(self, scope: str) -> None:
        scope = check_scope(scope)
        store = self.queue.store
        try:
            await store.backoff.call(lambda: store.storage.get(def_key(self.queue.name, scope)))
        except NotFound:
            raise InvalidInput("scope", f"no limit is set for {scope!r}") from None
        await store.backoff.call(lambda: store.storage.delete(def_key(self.queue.name, scope)))

    async def definitions(self) -> list[Limit]:
        """Every readable definition; an unreadable one is skipped (reported once, and its
        unchanged version not read again): a tampered limit costs only itself."""
        store = self.queue.store
        out = []
        for entry in await store.list(defs_prefix(self.queue.name)):
            if not is_direct_child(entry.key, defs_prefix(self.queue.name)) or store.bad.known(entry.key, entry.etag):
                continue
            try:
                blob = await store.backoff.call(lambda: store.storage.get(entry.key))
                out.append(parse_limit(blob.data, entry.key, backend=store.storage.name))
            except NotFound:
                continue
            except CorruptObject as exc:
                store.bad.report(exc, etag=blob.etag)
        return sorted(out, key=lambda l: l.scope)

    async def list(self) -> list[dict[str, Any]]:
        """Each limit with its current tokens and running count (``key:*``: its buckets)."""
        now = self.queue.clock.now()
        out = []
        for limit in await self.definitions():
            row: dict[str, Any] = {**limit.to_dict()}
            if limit.scope == "key:*":
                keyed = [e for e in await self.queue.store.list(state_prefix(self.queue.name) + "keyed.")]
                row["buckets"] = len(keyed)
            else:
                state = await read_state(self.queue, state_key(self.queue.name, scope_id(limit.scope)), limit, now)
                row["tokens"] = None if limit.rate is None else round(state.tokens, 2)
                row["running"] = len(state.live_running(now))
            out.append(row)
        return out
