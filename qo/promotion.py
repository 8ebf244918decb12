"""Moving due ``delayed/`` markers into the ready index.

The ready marker is written before the delayed one is deleted, so a crash in between
leaves both (harmless: the next promoter rewrites the same key) and never neither.
"""

from __future__ import annotations

import asyncio

import attrs

from . import keys
from .store import TaskStore


@attrs.frozen
class Promotion:
    promoted: int
    next_due: float | None  # earliest not-yet-due marker seen, if any
    types: frozenset[str]  # task types seen in delayed/ (due or not)
    more: bool  # the listing was cut at ``limit``: there may be other types


async def promote_due(store: TaskStore, now: float, *, limit: int = 100,
                      shards: list[int] | None = None) -> Promotion:
    """Promote every due marker of the first ``limit`` delayed ones (any task type); of
    the ``shards`` given only, in a spread queue (qo/layout.py)."""
    entries = await store.list(keys.delayed_prefix(store.queue), limit=limit, shards=shards)
    due: list[keys.Marker] = []
    types: set[str] = set()
    next_due = None
    for entry in entries:
        m = keys.parse_marker(entry.key)
        if m is None or m.kind != "delayed":
            continue
        types.add(m.task_type)
        if m.due > now:
            next_due = m.due if next_due is None else next_due
            continue
        due.append(m)
    await asyncio.gather(*(store.put_marker(keys.ready(store.queue, m.priority, m.due, m.task_id, m.task_type))
                           for m in due))
    done = [m.key for m in due]
    await store.delete_markers(done)
    return Promotion(len(done), next_due, frozenset(types), len(entries) >= limit)
