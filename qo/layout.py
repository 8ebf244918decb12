"""A queue's key layout: how many prefixes ("shards") its per-task keys are spread over.

S3 serves about 3,500 writes and 5,500 reads per second per partitioned prefix, and
qo's per-task keys grow in time order (a task id starts with its creation time, a
marker with its due time), so every new key lands at the end of one key range: one
partition takes all the writes, however S3 splits. A queue laid out in ``shards = P``
puts a shard directory ahead of the time-ordered part of the keys of the four kinds
written once or more per task::

    {q}/tasks/{s}/{id}.json   {q}/packs/{s}/{pack_id}.json
    {q}/ready/{s}/{inv}/...   {q}/delayed/{s}/{due}-...

where ``s`` (two hex digits) is drawn from random digits of the task's (or pack's) id,
so a task, its pack and its markers share a shard and ``get(id)`` is still one GET.
S3 can split each shard's range into a partition of its own: P shards take P times
the writes.

The layout is recorded in the queue's settings object (``{q}/settings.json``, beside
the shared settings every worker and producer reads anyway, so learning it costs no
request), by ``qo layout set --shards P`` before the queue's first task, and never
changed. A queue without one (every queue made before layouts existed, and the
default) is flat, exactly as before. A process that needs a spread key before it has
read the settings reads them then (one GET); a recorded layout is kept for good.

The engine never sees a shard: ``SpreadStorage`` wraps the queue's storage and maps the
logical keys the engine uses (``{q}/tasks/{id}.json``) to where they are stored. A LIST
of a spread kind is the merge, in logical key order, of one LIST per shard, so every
ordered scan (the ready index, ``qo list``, retention) stays exact; it costs P LISTs
where the flat layout costs one, which is the price of the spread (docs/architecture.md
§10). In a flat queue the wrapper steps aside after reading the record: no cost at all.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import zlib
from typing import Any, Awaitable, Callable, Iterable

import attrs

from .errors import ConfigurationError, InvalidInput
from .storage import Blob, Entry, delete_many

__all__ = ["Layout", "SpreadStorage", "SHARD_COUNTS", "SPREAD_KINDS"]

SCHEMA = 1
#: the shard counts a queue may have (a power of two: every shard gets an equal share
#: of the ids' random digits)
SHARD_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: the kinds of keys spread over the shards: those written once or more per task
SPREAD_KINDS = ("delayed", "packs", "ready", "tasks")


def check_shards(value: Any) -> int:
    """``value`` as a shard count, or ``InvalidInput`` naming ``shards``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value not in SHARD_COUNTS:
        raise InvalidInput("shards", f"{value!r} is not a shard count (one of {', '.join(map(str, SHARD_COUNTS))})")
    return value


@attrs.frozen
class Layout:
    """How a queue's keys are laid out: ``shards`` prefixes per spread kind (1: flat)."""

    shards: int = 1
    #: whether the queue's settings object records it (False: none recorded, flat)
    recorded: bool = False

    def to_doc(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "shards": self.shards}

    @classmethod
    def from_doc(cls, doc: Any, key: str) -> "Layout":
        """The layout recorded in the settings object at ``key`` (``None``: flat). A record
        this release cannot read stops the queue with a clear error: guessing a layout
        would put tasks where no worker looks."""
        if doc is None:
            return cls()
        try:
            if not isinstance(doc, dict) or not isinstance(doc.get("schema"), int):
                raise ValueError("not a layout record")
            if doc["schema"] > SCHEMA:
                raise ValueError(f"schema {doc['schema']} is newer than this release's ({SCHEMA}): upgrade qo")
            shards = check_shards(doc.get("shards"))
        except (ValueError, InvalidInput) as exc:
            raise ConfigurationError(f"the queue's layout in {key} is unreadable ({exc}); "
                                     "restore it (`qo layout set` wrote it)") from None
        return cls(shards, recorded=True)


def shard_of(kind: str, rest: str, shards: int) -> int:
    """The shard of the key ``{q}/{kind}/{rest}``: two random hex digits of the id in it
    (characters 16-17 of a task or pack id), else a checksum of ``rest`` (any other
    name lands somewhere fixed)."""
    if kind in ("tasks", "packs"):
        ident = rest.partition(".")[0]
    elif kind == "ready":
        ident = rest.partition("/")[2].split("-", 2)[1:2]
        ident = ident[0] if ident else ""
    else:  # delayed: {due}-{inv}-{id}-{type}
        parts = rest.split("-", 3)
        ident = parts[2] if len(parts) > 2 else ""
    digits = ident[16:18]
    if len(digits) == 2 and all(c in "0123456789abcdef" for c in digits):
        return int(digits, 16) % shards
    return zlib.crc32(rest.encode("utf-8", "surrogatepass")) % shards


class _Stream:
    """One shard's (or the unspread rest's) listing, page by page, as logical keys."""

    __slots__ = ("storage", "prefix", "cursor", "limit", "to_logical", "skip", "buffer", "more")

    def __init__(self, storage: Any, prefix: str, start_after: str | None, limit: int,
                 to_logical: Any, skip: tuple[str, ...] = ()):
        self.storage, self.prefix, self.cursor, self.limit = storage, prefix, start_after, limit
        self.to_logical, self.skip = to_logical, skip
        self.buffer: list[Entry] = []
        self.more = True

    async def fill(self) -> None:
        """Read pages until one yields something (or the listing ends)."""
        while not self.buffer and self.more:
            page = await self.storage.list(self.prefix, start_after=self.cursor, limit=self.limit)
            self.more = len(page) >= self.limit
            if page:
                self.cursor = page[-1].key
            for e in page:
                if self.skip and e.key.startswith(self.skip):
                    # a spread kind's stored keys: its shard streams list them; list on
                    # from past the kind ("~" sorts after its shard directories)
                    kind = next(kp for kp in self.skip if e.key.startswith(kp))
                    self.cursor, self.more = max(kind + "~", e.key), True
                    break
                key = self.to_logical(e.key)
                self.buffer.append(e if key == e.key else attrs.evolve(e, key=key))
            self.buffer.reverse()  # pop() from the end is the next key


#: attributes of the wrapper itself (the storage methods: a test may stand one in)
_OWN = frozenset({"inner", "queue", "layout", "loader", "get", "put", "delete", "list", "delete_many"})


class SpreadStorage:
    """The storage of one queue seen through its layout: logical keys in, stored keys
    out. Every other attribute is the wrapped storage's."""

    def __init__(self, inner: Any, queue: str, loader: Callable[[], Awaitable[Any]]):
        """``loader`` reads the queue's settings object (which calls ``learn``)."""
        self.inner = inner
        self.queue = queue
        self.loader = loader
        self._root = f"{queue}/"
        self._kinds = tuple(f"{queue}/{k}/" for k in SPREAD_KINDS)
        self.layout: Layout | None = None
        self._lock: asyncio.Lock | None = None
        self._stepped: set[str] = set()  # methods replaced by the backend's own (flat)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """The wrapper's own state stays here; anything else (a backend's ``page_size``, a
        fault injector's switch) is set on the backend, as if there were no wrapper."""
        if name.startswith("_") or name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __repr__(self) -> str:
        return repr(self.inner)

    # -- the layout ------------------------------------------------------------------

    async def get_layout(self, *, refresh: bool = False) -> Layout:
        """The queue's layout: learned when the queue's settings are read (a worker and a
        producer read them anyway), else read now through ``loader`` (one GET)."""
        if self.layout is not None and not refresh:
            return self.layout
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.layout is None or refresh:
                await self.loader()  # reads the settings object, which calls learn()
        assert self.layout is not None
        return self.layout

    def learn(self, layout: Layout) -> None:
        """Use ``layout`` (read with the queue's settings). A recorded layout is kept for
        good: it never changes."""
        if self.layout is None or (layout.recorded and not self.layout.recorded):
            self._use(layout)

    def _use(self, layout: Layout) -> None:
        self.layout = layout
        if layout.shards == 1:  # flat: step aside, every call goes straight to the backend
            for name in ("get", "put", "delete", "list", "delete_many"):
                if name not in self.__dict__:  # (not over a test's stand-in)
                    target = getattr(self.inner, name, None) or self._delete_each
                    setattr(self, name, target)
                    self._stepped.add(name)
        else:
            for name in self._stepped:
                self.__dict__.pop(name, None)
            self._stepped.clear()

    async def first_task_key(self) -> str | None:
        """A stored key of a spread kind, if the queue holds any (one LIST a kind)."""
        for kind in self._kinds:
            found = await self.inner.list(kind, limit=1)
            if found:
                return found[0].key
        return None

    # -- keys -------------------------------------------------------------------------

    def stored_key(self, key: str, shards: int) -> str:
        """Where the logical ``key`` is stored under ``shards``."""
        if shards > 1 and isinstance(key, str) and key.startswith(self._root):
            kind, sep, rest = key[len(self._root):].partition("/")
            if sep and rest and kind in SPREAD_KINDS:
                return f"{self._root}{kind}/{shard_of(kind, rest, shards):02x}/{rest}"
        return key

    async def _key(self, key: str) -> str:
        if not isinstance(key, str) or not key.startswith(self._kinds):
            return key  # not a spread kind: no need to know the layout
        layout = self.layout or await self.get_layout()
        return self.stored_key(key, layout.shards)

    # -- the storage protocol ------------------------------------------------------

    async def get(self, key: str) -> Blob:
        return await self.inner.get(await self._key(key))

    async def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        return await self.inner.put(await self._key(key), data, if_match=if_match, if_none_match=if_none_match)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        await self.inner.delete(await self._key(key), if_match=if_match)

    async def delete_many(self, keys: list[str]) -> None:
        await delete_many(self.inner, [await self._key(k) for k in keys])

    async def _delete_each(self, keys: Iterable[str]) -> None:
        await delete_many(self.inner, keys)

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000,
                   shards: Iterable[int] | None = None) -> list[Entry]:
        """Keys under ``prefix`` after ``start_after`` in logical order: a spread kind's
        keys are the merge of its shards' listings (one LIST each, then more pages of
        those that run out first). ``shards``: only the keys of these shards (a worker
        lists one shard a time: see qo/feed.py)."""
        if not isinstance(prefix, str) or not any(prefix.startswith(kp) or kp.startswith(prefix) for kp in self._kinds):
            return await self.inner.list(prefix, start_after=start_after, limit=limit)  # (the backend checks it)
        layout = self.layout or await self.get_layout()
        if layout.shards == 1:
            return await self.inner.list(prefix, start_after=start_after, limit=limit)
        chosen = range(layout.shards) if shards is None else sorted({s % layout.shards for s in shards})
        streams: list[_Stream] = []
        inside = False  # the prefix lies within one spread kind
        for kind_prefix in self._kinds:
            if not (prefix.startswith(kind_prefix) or kind_prefix.startswith(prefix)):
                continue
            inside = inside or prefix.startswith(kind_prefix)
            if start_after is not None and start_after > kind_prefix and not start_after.startswith(kind_prefix):
                continue  # the whole kind sorts at or before start_after
            sub = prefix[len(kind_prefix):]
            after = start_after[len(kind_prefix):] if start_after is not None and start_after.startswith(kind_prefix) else None
            for s in chosen:
                base = f"{kind_prefix}{s:02x}/"
                cut = len(base)
                streams.append(_Stream(self.inner, base + sub, None if after is None else base + after, limit,
                                       lambda k, kp=kind_prefix, c=cut: kp + k[c:]))
        if not inside and shards is None:
            streams.append(_Stream(self.inner, prefix, start_after, limit, lambda k: k,
                                   skip=tuple(kp for kp in self._kinds if kp.startswith(prefix) or prefix.startswith(kp))))
        await asyncio.gather(*(s.fill() for s in streams))
        out: list[Entry] = []
        heap = [(s.buffer[-1].key, i) for i, s in enumerate(streams) if s.buffer]
        heapq.heapify(heap)
        while heap and len(out) < limit:
            _, i = heapq.heappop(heap)
            stream = streams[i]
            out.append(stream.buffer.pop())
            if not stream.buffer:
                await stream.fill()
            if stream.buffer:
                heapq.heappush(heap, (stream.buffer[-1].key, i))
        return out

    async def close(self) -> None:
        await self.inner.close()


def shard_count(storage: Any) -> int:
    """How many shards the queue behind ``storage`` has, as far as is known (1: flat,
    or a storage seen without a layout)."""
    layout = getattr(storage, "layout", None)
    return layout.shards if isinstance(layout, Layout) else 1


class Rotation:
    """Which shard a worker lists next: one a time, in turn from a random start, so a
    busy worker's refill costs one LIST whatever the shard count; ``nothing`` counts the
    shards found empty in a row: a whole turn of them is what "nothing to do" means."""

    def __init__(self) -> None:
        self.next: int | None = None
        self.nothing = 0

    def take(self, shards: int) -> int:
        if self.next is None:
            self.next = random.randrange(shards)
        shard, self.next = self.next % shards, (self.next + 1) % shards
        return shard

    def found(self, anything: bool, shards: int) -> bool:
        """Record what the last shard held; True once a whole turn found nothing."""
        if anything:
            self.nothing = 0
            return False
        self.nothing += 1
        if self.nothing >= shards:
            self.nothing = 0
            return True
        return False
