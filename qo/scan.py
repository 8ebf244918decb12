"""``qo doctor --scan``: every object under a queue that qo cannot read, and why.

Each key is judged by the folder it lies in, with the same parser the engine uses
when it meets that object (so the scan and the engine agree on what is bad). The
scan reads every object of the queue: one LIST per 1000 keys plus one GET per
object that has a body, so its cost follows the queue's size. It is an operator's
tool for a night when something looks wrong, not something to poll. In a queue laid
out in shards (qo/layout.py) it also lists the spread kinds as stored, to name the
keys no worker reads there: outside the shard directories, or in the wrong one.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import attrs

from . import keys, stored
from .errors import CorruptObject, NotFound
from .idempotency import decode_record
from .layout import SPREAD_KINDS, shard_count
from .leases import parse_record
from .limits import defs_prefix, parse_limit, state_prefix
from .model import Task
from .packs import Pack
from .limit_model import parse_state
from .schedule_model import Schedule, schedules_prefix
from .tombstones import is_tombstone


@attrs.frozen
class Finding:
    key: str
    reason: str


def _task(data: bytes, key: str) -> None:
    Task.from_json(data, key)


def _pack(data: bytes, key: str) -> None:
    pack = Pack.from_json(data, key)
    for i in range(len(pack.entries)):  # every task in it, as a reader builds it
        pack.task(i, key)


def _schedule(data: bytes, key: str) -> None:
    schedule = Schedule.from_json(data, key)
    if not key.endswith(f"/{schedule.name}.json"):
        raise CorruptObject(key, f"holds schedule {schedule.name!r}, not the one its key names")


def _json_object(data: bytes, key: str) -> None:
    stored.decode(data, key)


def _parser(queue: str, key: str) -> tuple[Callable[[bytes, str], Any] | None, str | None]:
    """How to read ``key`` (None: nothing to read), or why the key itself is wrong."""
    rest = key[len(queue) + 1:]
    folder = rest.split("/", 1)[0]
    if folder in ("ready", "delayed"):
        return None, None if keys.parse_marker(key) is not None else "not a marker key qo writes"
    if folder == "deps":
        return None, None if keys.parse_dep(key) is not None else "not a dependency edge key qo writes"
    if folder == "tasks":
        return (_task, None) if keys.task_id_of(key) else (None, "not a task key (tasks/<24 hex>.json)")
    if folder == "packs":
        name = rest[len("packs/"):]
        ok = keys.is_direct_child(key, keys.packs_prefix(queue)) and name.endswith(".json") \
            and keys.PACK_ID.match(name[:-len(".json")]) is not None
        return (_pack, None) if ok else (None, "not a pack key (packs/<21 hex>.json)")
    if folder == "schedules":
        ok = keys.is_direct_child(key, schedules_prefix(queue)) and key.endswith(".json")
        return (_schedule, None) if ok else (None, "not a schedule key (schedules/<name>.json)")
    if folder == "workers":
        ok = keys.is_direct_child(key, keys.workers_prefix(queue)) and key.endswith(".json")
        return (lambda d, k: is_tombstone(d) or parse_record(d, k), None) if ok else (None, "not a worker record key")
    if key.startswith(defs_prefix(queue)):
        return lambda d, k: parse_limit(d, k), None
    if key.startswith(state_prefix(queue)):
        return lambda d, k: parse_state(d, k, ""), None
    if folder == "idem-exp":
        return None, None if keys.parse_idem_expiry(queue, key) is not None else "not an idempotency expiry key"
    if folder == "idem":
        return lambda d, k: is_tombstone(d) or decode_record(d, k), None
    if folder == "payloads":  # an input or output stored apart: checked by its reader (sha256), not read here
        return None, None if keys.is_payload_key(key) else "not a payload key qo writes"
    if rest == "settings.json":
        return _json_object, None
    return None, None  # not a key this release knows (a newer one's, a plugin's): left alone


async def scan(queue: Any, *, concurrency: int = 16,
               progress: Callable[[int], None] | None = None) -> AsyncIterator[Finding]:
    """Every unreadable object under ``{queue}/``, in key order (within a page of 1000)."""
    storage = queue.storage
    prefix = f"{queue.name}/"
    sem = asyncio.Semaphore(concurrency)
    seen = 0

    async def judge(key: str) -> Finding | None:
        parse, wrong = _parser(queue.name, key)
        if wrong is not None:
            return Finding(key, wrong)
        if parse is None:
            return None
        async with sem:
            try:
                blob = await queue.store.backoff.call(lambda: storage.get(key))
            except NotFound:
                return None  # removed since the listing
        try:
            parse(blob.data, key)
        except CorruptObject as exc:
            return Finding(key, exc.reason)
        return None

    cursor: str | None = None
    while True:
        page = await queue.store.list(prefix, start_after=cursor, limit=1000)
        for finding in await asyncio.gather(*(judge(e.key) for e in page)):
            if finding is not None:
                yield finding
        seen += len(page)
        if progress is not None:
            progress(seen)
        if len(page) < 1000:
            break
        cursor = page[-1].key
    shards = shard_count(storage)
    if shards > 1:
        async for finding in _astray(queue, shards):
            yield finding


async def _astray(queue: Any, shards: int) -> AsyncIterator[Finding]:
    """Stored keys of a spread queue's kinds that its layout does not place where they
    are (no worker lists or reads them)."""
    homes = {f"{s:02x}" for s in range(shards)}
    for kind in SPREAD_KINDS:
        prefix = f"{queue.name}/{kind}/"
        cursor: str | None = None
        while True:
            page = await queue.store.backoff.call(
                lambda: queue.backend.list(prefix, start_after=cursor, limit=1000))
            for entry in page:
                home, _, rest = entry.key[len(prefix):].partition("/")
                if home not in homes or not rest:
                    yield Finding(entry.key, f"outside the {shards} shard directories of the queue's layout: "
                                             "no worker reads it")
                    continue
                belongs = queue.storage.stored_key(prefix + rest, shards)
                if belongs != entry.key:
                    yield Finding(entry.key, f"in shard {home}, but its name belongs in shard "
                                             f"{belongs[len(prefix):len(prefix) + 2]}: no worker finds it here")
            if len(page) < 1000:
                break
            cursor = page[-1].key
