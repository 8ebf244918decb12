"""Gauges of the queue as a whole, from ``queue.stats()``, refreshed in the worker process.

A worker's events say what *it* did; these say where the *queue* stands: depth by
status and priority band, the oldest due task's wait, dead letters, live workers. They
are set from a snapshot taken every ``QO_METRICS_STATS_INTERVAL`` seconds (default 30;
0 turns them off) by an asyncio task the plugin starts in ``qo_worker_started`` and
stops in ``qo_worker_stopping``; a scrape reads the last snapshot and costs no request.
One snapshot costs what ``queue.stats()`` costs: about 10 requests on a queue with
fewer than 1000 tasks of each status (8 LISTs, one LIST and a GET per worker record,
plus a GET per schedule and limit), so about 20 requests a minute per worker process at
the default interval, whatever the queue's history.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger("qo_metrics")

#: seconds between snapshots unless QO_METRICS_STATS_INTERVAL says otherwise
DEFAULT_INTERVAL = 30.0


def interval_from_env(env: Any = None) -> float:
    """``QO_METRICS_STATS_INTERVAL`` (seconds; 0 or ``off``: no gauges), else 30."""
    raw = (env if env is not None else os.environ).get("QO_METRICS_STATS_INTERVAL", "").strip().lower()
    if not raw:
        return DEFAULT_INTERVAL
    if raw in ("0", "off", "no", "false"):
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        log.warning("QO_METRICS_STATS_INTERVAL=%r is not a number of seconds; using %g", raw, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    return value if value > 0 else 0.0


class QueueGauges:
    """The gauges, labelled by queue, and what sets them from a ``stats()`` snapshot."""

    def __init__(self, registry: CollectorRegistry):
        self.tasks = Gauge("qo_queue_tasks", "Tasks in the queue by status, from queue.stats() (pending, blocked, "
                           "running, failed, cancelled, skipped, expired; a lower bound past 10,000).",
                           ["queue", "status"], registry=registry)
        self.ready = Gauge("qo_queue_ready_tasks", "Due tasks waiting to be claimed, by priority band.",
                           ["queue", "band"], registry=registry)
        self.oldest_due = Gauge("qo_queue_oldest_due_age_seconds", "How long the oldest due task has waited to be "
                                "claimed (0: none is waiting).", ["queue"], registry=registry)
        self.dead_letters = Gauge("qo_queue_dead_letters", "Failed tasks (dead letters) in the queue.",
                                  ["queue"], registry=registry)
        self.live_workers = Gauge("qo_queue_live_workers", "Workers whose heartbeat is within their lease.",
                                  ["queue"], registry=registry)
        self.updated = Gauge("qo_queue_stats_timestamp_seconds", "When the snapshot behind the qo_queue_* gauges "
                             "was taken (epoch seconds; stale if the refresh keeps failing).",
                             ["queue"], registry=registry)

    def update(self, stats: dict[str, Any]) -> None:
        """Set every gauge of ``stats["queue"]`` from one ``queue.stats()`` snapshot."""
        queue = str(stats["queue"])
        for status, n in stats["counts"].items():
            self.tasks.labels(queue=queue, status=status).set(n)
        for band, n in stats["ready_by_band"].items():
            self.ready.labels(queue=queue, band=band).set(n)
        self.oldest_due.labels(queue=queue).set(stats["oldest_due_age_s"] or 0.0)
        self.dead_letters.labels(queue=queue).set(stats["dead_letters"])
        self.live_workers.labels(queue=queue).set(stats["live_workers"])
        self.updated.labels(queue=queue).set(stats["at"])


class Refresher:
    """One asyncio task per running worker, taking a snapshot every ``interval`` seconds."""

    def __init__(self, gauges: QueueGauges):
        self.gauges = gauges
        self.running: dict[int, asyncio.Task] = {}

    def start(self, worker: Any, interval: float | None = None) -> asyncio.Task | None:
        interval = interval_from_env() if interval is None else interval
        if not interval or id(worker) in self.running:
            return None
        task = asyncio.get_running_loop().create_task(self._loop(worker.queue, interval),
                                                      name="qo-metrics-stats")
        self.running[id(worker)] = task
        return task

    def stop(self, worker: Any) -> None:
        task = self.running.pop(id(worker), None)
        if task is not None:
            task.cancel()

    async def _loop(self, queue: Any, interval: float) -> None:
        failing = False
        while True:
            try:
                self.gauges.update(await queue.stats())
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # storage down, a bad object: the gauges go stale, said once
                if not failing:
                    log.warning("qo-metrics: queue.stats() failed, the qo_queue_* gauges keep their last values: %s",
                                exc)
                failing = True
            await asyncio.sleep(interval)
