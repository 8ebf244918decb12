"""``queue.stats()``: the queue at a glance, at a cost bounded whatever its history.

Every number comes from an index that already exists, never from reading tasks:

- pending: the ``ready/`` and ``delayed/`` markers (keys carry priority and due time; a
  pack's marker counts the tasks it was written with: its id says how many);
- blocked: the distinct children named by ``deps/`` edges;
- failed, cancelled, skipped, expired: the ``ended/`` index;
- running and workers: the worker records (heartbeat, leases, counters);
- schedules and limits: their own objects.

Each index is listed at most ``MAX_PAGES`` pages of 1000 keys: a count is exact below
that and reported as a lower bound (``exact: false``) above it. Bound on requests:
``2 x MAX_PAGES`` LISTs for pending, ``MAX_PAGES`` for blocked, ``4 x MAX_PAGES`` for
the ended statuses (one page each on a queue with fewer than 1000 of each), 1 LIST and
one GET per worker record (at most 1000), per schedule and per limit. ``completed`` has
no index (the happy path writes none): the stats report what the live workers
completed since they started, from their records.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import keys
from .listing import live_records
from .model import ENDED_INDEXED

#: pages of 1000 keys listed per index, at most
MAX_PAGES = 10
#: priority bands of the ready depth (name, lowest priority in it)
BANDS = (("critical", 255), ("high", 192), ("normal", 128), ("low", 64), ("background", 0))


async def _count(queue: Any, prefix: str, on_key: Any = None) -> tuple[int, bool]:
    """Keys under ``prefix`` (at most MAX_PAGES pages) and whether that is all of them."""
    n, cursor = 0, None
    for _ in range(MAX_PAGES):
        page = await queue.store.list(prefix, start_after=cursor, limit=1000)
        for entry in page:
            weight = True if on_key is None else on_key(entry.key)
            if weight is not False:  # a pack's marker counts the tasks it holds
                n += weight if isinstance(weight, int) and not isinstance(weight, bool) else 1
        if len(page) < 1000:
            return n, True
        cursor = page[-1].key
    return n, False


def _numbers(value: Any) -> dict[str, float]:
    """A record's ``{op: number}`` field as stored, or {} if absent or not that shape."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0}


def band_of(priority: int) -> str:
    for name, low in BANDS:
        if priority >= low:
            return name
    return "background"


async def queue_stats(queue: Any) -> dict[str, Any]:
    """Counts by status, ready depth by band, oldest due age, workers, schedules, limits."""
    now = queue.clock.now()
    bands = {name: 0 for name, _ in BANDS}
    oldest_due: list[float] = []
    next_delayed: list[float] = []
    children: set[str] = set()

    def ready(key: str) -> bool | int:
        m = keys.parse_marker(key)
        if m is None or m.kind != "ready":
            return False
        weight = keys.pack_size(m.task_id) if m.is_pack else 1
        bands[band_of(m.priority)] += weight
        if not oldest_due or m.due < oldest_due[0]:
            oldest_due[:] = [m.due]
        return weight

    def delayed(key: str) -> bool:
        m = keys.parse_marker(key)
        if m is None or m.kind != "delayed":
            return False
        if not next_delayed:
            next_delayed.append(m.due)  # the index is in due order
        return True

    def edge(key: str) -> bool:
        e = keys.parse_dep(key)
        if e is None or e[1] in children:
            return False
        children.add(e[1])
        return True

    ended_statuses = sorted(ENDED_INDEXED)
    (ready_n, ready_all), (delayed_n, delayed_all), (blocked_n, blocked_all), *ended = await asyncio.gather(
        _count(queue, keys.ready_prefix(queue.name), ready),
        _count(queue, keys.delayed_prefix(queue.name), delayed),
        _count(queue, keys.deps_root(queue.name), edge),
        *(_count(queue, keys.ended_prefix(queue.name, s), lambda k: keys.parse_ended(k) is not None)
          for s in ended_statuses),
    )
    records = await live_records(queue, alive_only=False)
    workers = []
    running = completed = 0
    for r in sorted(records, key=lambda r: r["worker_id"]):
        alive = now <= r["heartbeat_at"] + r["lease_ttl"]
        counts = r.get("counts") if isinstance(r.get("counts"), dict) else {}
        # the handlers running at the record's last write; a record of an older release
        # has only its leases, which also name candidates about to be claimed
        held = r.get("running")
        named = sum(keys.pack_size(t) if keys.PACK_ID.match(t) else 1 for t in r["leases"])  # a pack names its tasks
        held = held if isinstance(held, int) and not isinstance(held, bool) and 0 <= held <= named else named
        workers.append({"worker_id": r["worker_id"], "host": r.get("host"), "pid": r.get("pid"), "alive": alive,
                        "heartbeat_age_s": round(now - r["heartbeat_at"], 1), "running": held,
                        "leases": named,  # the tasks its record names (a pack's: all of them)
                        "completed": counts.get("completed", 0), "failed": counts.get("failed", 0),
                        "started_at": r.get("started_at"),
                        # the requests its queue made since started_at, and per minute lately
                        # (qo/meter.py); empty from a worker of an older release
                        "requests": _numbers(r.get("requests")),
                        "requests_per_minute": _numbers(r.get("requests_per_minute"))})
        if alive:
            running += held
            completed += counts.get("completed", 0) if isinstance(counts.get("completed", 0), int) else 0
    schedules = await queue.schedules.list()
    limits = await queue.limits.list()
    counts = {"pending": ready_n + delayed_n, "blocked": blocked_n, "running": running,
              **{s: n for s, (n, _) in zip(ended_statuses, ended)}}
    exact = {"pending": ready_all and delayed_all, "blocked": blocked_all, "running": False,
             **{s: all_ for s, (_, all_) in zip(ended_statuses, ended)}}
    layout = getattr(queue.storage, "layout", None)  # known by now: listing ready/ needed it
    return {
        "queue": queue.name,
        "at": now,
        # the key layout (qo/layout.py): 1 is flat
        "shards": layout.shards if layout is not None else 1,
        "counts": counts,
        # running: leases named in live workers' records (a candidate about to be claimed
        # is named too); other counts are exact unless false here (then a lower bound)
        "exact": exact,
        "ready": ready_n,
        "delayed": delayed_n,
        "ready_by_band": bands,
        "oldest_due_age_s": round(now - oldest_due[0], 3) if oldest_due else None,
        "next_delayed_in_s": round(next_delayed[0] - now, 3) if next_delayed else None,
        "dead_letters": counts["failed"],
        "completed_by_live_workers": completed,
        "workers": workers,
        "live_workers": sum(1 for w in workers if w["alive"]),
        "schedules": [{"name": s.name, "enabled": s.enabled, "cron": s.cron, "timezone": s.timezone,
                       "next_fire_at": s.next_fire_at, "last_fire_at": s.last_fire_at,
                       "last_task_id": s.last_task_id} for s in schedules],
        "limits": limits,
    }
