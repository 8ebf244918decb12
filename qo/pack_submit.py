"""``submit_many``'s bulk path: which tasks can be packed, and writing their packs
(docs/architecture.md §5k). A pack is written as a single task is: its ready marker
first, then the pack (create-only), so a pack is never without its marker."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from . import keys
from .errors import PreconditionFailed, QoError
from .events import emit
from .model import PAYLOAD_INLINE_BYTES, PENDING, Task, dumps
from .packs import PACK_BYTES, PACK_SIZE, Pack

#: a group smaller than this goes the single path (a pack of one saves nothing)
MIN_PACK = 2


def packable(task: Task, request: Any, now: float) -> bool:
    """Whether ``task`` keeps every guarantee inside a pack: nothing that needs an object
    of its own (an idempotency record, dependency edges, a per-key limit, an expiry, a
    due time ahead, an input stored apart)."""
    return (request is None and task.status == PENDING and not task.depends_on and task.rate_limit_key is None
            and task.expires_at is None and task.available_at <= now + 0.005
            and len(dumps(task.input)) <= PAYLOAD_INLINE_BYTES)


def plan(prepared: list[tuple[Task, Any]], now: float) -> tuple[list[list[int]], list[int]]:
    """Split the indexes of ``prepared`` into packs (same type and priority, in order, at
    most ``PACK_SIZE`` entries and ``PACK_BYTES`` of inputs) and the rest (single path)."""
    groups: dict[tuple[str, int], list[list[int]]] = {}
    sizes: dict[tuple[str, int], int] = {}
    single: list[int] = []
    for i, (task, request) in enumerate(prepared):
        if not packable(task, request, now):
            single.append(i)
            continue
        group = (task.task_type, task.priority)
        size = len(dumps(task.input)) + 200
        chunks = groups.setdefault(group, [[]])
        if len(chunks[-1]) >= PACK_SIZE or (chunks[-1] and sizes[group] + size > PACK_BYTES):
            chunks.append([])
            sizes[group] = 0
        chunks[-1].append(i)
        sizes[group] = sizes.get(group, 0) + size
    packs: list[list[int]] = []
    for chunks in groups.values():
        for chunk in chunks:
            if len(chunk) >= MIN_PACK:
                packs.append(chunk)
            else:
                single.extend(chunk)
    return packs, sorted(single)


async def write_packs(queue: Any, tasks: list[Task], packs: list[list[int]], *, concurrency: int, grace: float,
                      done: Callable[[int], None], errors: list[tuple[int, BaseException]]) -> None:
    """Write each pack of ``tasks`` (indexes in ``packs``): its tasks get their ids in
    the pack; a pack that could not be written puts all its indexes in ``errors``."""
    sem = asyncio.Semaphore(max(1, min(concurrency, 8)))

    async def one(indexes: list[int]) -> None:
        members = [tasks[i] for i in indexes]
        async with sem:
            try:
                for attempt in range(3):
                    pack_id = keys.new_pack_id(len(members))
                    for n, task in enumerate(members):
                        task.id = keys.entry_id(pack_id, n)
                    now = queue.clock.now()
                    pack = Pack.build(pack_id, members, now)
                    marker = pack.marker_key(queue.name)
                    await queue.store.put_marker(marker)
                    try:
                        await queue.store.packs.create(pack)
                    except PreconditionFailed:  # another producer drew the same id: draw again
                        if attempt == 2:
                            raise
                        continue
                    if queue.clock.now() - now > grace / 2:
                        await queue.store.put_marker(marker)  # a worker may have dropped it as an orphan
                    break
            except QoError as exc:
                errors.extend((i, exc) for i in indexes)
                return
        for task in members:
            emit(queue.plugins, "submitted", task)
        done(len(indexes))

    await asyncio.gather(*(one(p) for p in packs))
