"""``qo stats``: the queue at a glance (bounded cost, see ``qo/stats.py``)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from ..backends import redact_url
from ..model import iso
from .common import echo_json, open_queue, queue_options, run, say_if_no_objects


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _n(stats: dict[str, Any], status: str) -> str:
    return f"{stats['counts'][status]}{'' if stats['exact'][status] else '+'}"


def render(stats: dict[str, Any], where: str) -> str:
    """The human view of ``queue.stats()``; a count ending in + is a lower bound."""
    c = stats["counts"]
    spread = f"    keys in {stats['shards']} shards" if stats.get("shards", 1) > 1 else ""
    lines = [f"queue {stats['queue']!r} at {where}    {iso(stats['at'])}{spread}",
             f"  tasks      pending {_n(stats, 'pending')} (ready {stats['ready']}, delayed {stats['delayed']})"
             f"   running {c['running']}   blocked {_n(stats, 'blocked')}",
             f"  ended      failed {_n(stats, 'failed')} (dead letters)   cancelled {_n(stats, 'cancelled')}"
             f"   skipped {_n(stats, 'skipped')}   expired {_n(stats, 'expired')}",
             "  ready by   " + "   ".join(f"{k} {v}" for k, v in stats["ready_by_band"].items())
             + f"   (oldest due {_age(stats['oldest_due_age_s'])} ago)" * (stats["oldest_due_age_s"] is not None),
             ]
    if stats["next_delayed_in_s"] is not None:
        lines.append(f"  delayed    next due in {_age(stats['next_delayed_in_s'])}")
    rpm = [sum(w.get("requests_per_minute", {}).values()) for w in stats["workers"]
           if w["alive"] and w.get("requests_per_minute")]
    lines.append(f"  workers    {stats['live_workers']} live; completed by them since they started: "
                 f"{stats['completed_by_live_workers']}"
                 + (f"; their storage requests: {sum(rpm):,.0f}/min" if rpm else ""))
    for w in stats["workers"]:
        state = "live" if w["alive"] else "STALE (its tasks are recovered)"
        requests = (f"   requests {sum(w['requests_per_minute'].values()):,.0f}/min"
                    if w.get("requests_per_minute") else "")
        lines.append(f"    {w['worker_id']:<36} {state:<5} heartbeat {_age(w['heartbeat_age_s'])} ago   "
                     f"running {w['running']}   completed {w['completed']}   failed {w['failed']}{requests}")
    if stats["schedules"]:
        lines.append("  schedules")
        for s in stats["schedules"]:
            nxt = iso(s["next_fire_at"]) if s["next_fire_at"] is not None and s["enabled"] else "paused"
            lines.append(f"    {s['name']:<24} {s['cron']:<18} {s['timezone']:<16} next {nxt}")
    if stats["limits"]:
        lines.append("  limits")
        for row in stats["limits"]:
            now = [f"tokens {row['tokens']:g}"] if row.get("tokens") is not None else []
            if row.get("concurrency"):
                now.append(f"running {row.get('running', 0)}/{row['concurrency']}")
            if "buckets" in row:
                now.append(f"{row['buckets']} key buckets")
            lines.append(f"    {row['scope']:<24} {', '.join(now)}")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (per refresh with --watch).")
@click.option("--watch", type=click.FloatRange(min=0.5), default=None, metavar="SECONDS",
              help="Refresh every SECONDS until interrupted.")
@queue_options
@run
async def stats(as_json: bool, watch: float | None, url: str, queue_name: str) -> None:
    """The queue at a glance: counts by status, ready depth by priority band, oldest due
    age, workers, schedules, limits. Costs a bounded number of requests (about 10 on a
    small queue), whatever the queue's history."""
    async with await open_queue(url, queue_name) as queue:
        where = redact_url(queue.url)
        if watch is None and not as_json and await say_if_no_objects(queue):
            return
        while True:
            result = await queue.stats()
            if as_json:
                echo_json(result)
            else:
                if watch is not None and sys.stdout.isatty():
                    click.clear()
                click.echo(render(result, where))
            if watch is None:
                return
            try:
                await asyncio.sleep(watch)
            except asyncio.CancelledError:
                return
