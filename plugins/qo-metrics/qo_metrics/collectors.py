"""The metrics: fed one task event at a time, kept in this plugin's own registry.

Durations are read from the task as stored (``started_at``, ``finished_at``,
``updated_at``, ``created_at``: epoch seconds written by the worker that ran it), so a
process observes correct durations from its own events without remembering anything
between them.
"""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram

from .gauges import QueueGauges, Refresher

#: run times: from tens of milliseconds to an hour
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: queue waits: up to a day (a task may be scheduled ahead or wait behind a backlog)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
#: the events whose task carries the end of an attempt that this process can time
RUN_OUTCOMES = ("succeeded", "failed", "retried")


class Metrics:
    """qo's task metrics in a registry of their own (``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        #: something reads these metrics (``serve`` ran): only then do workers pay for the
        #: queue gauges' ``stats()`` snapshots (or when QO_METRICS_STATS_INTERVAL is set)
        self.served = False
        self.tasks = Counter(
            "qo_tasks_total", "Task lifecycle events observed by this process, by task type and event.",
            ["task_type", "event"], registry=self.registry)
        self.run_seconds = Histogram(
            "qo_task_run_seconds", "Duration of a task attempt (started to succeeded, failed or retried), "
            "by task type and outcome.", ["task_type", "outcome"], buckets=RUN_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram(
            "qo_task_queue_wait_seconds", "Time from a task's creation to the start of its first attempt, "
            "by task type.", ["task_type"], buckets=WAIT_BUCKETS, registry=self.registry)
        #: the queue as a whole, from queue.stats() snapshots (qo_metrics/gauges.py)
        self.queue = QueueGauges(self.registry)
        self.refresher = Refresher(self.queue)
        #: (metric, label values) -> its child: ``labels()`` validates and locks on every
        #: call to find the same child (children are never removed here), once per event
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, event: str, task: Any) -> None:
        """Record one ``qo_task_event``."""
        task_type = str(getattr(task, "task_type", "") or "unknown")
        self._child(self.tasks, task_type, event).inc()
        started = getattr(task, "started_at", None)
        if event == "started":
            created = getattr(task, "created_at", None)
            # first attempt only: a retry's start would count its earlier attempts as waiting
            if started is not None and created and getattr(task, "attempt", 0) == 1 and started >= created:
                self._child(self.queue_wait_seconds, task_type).observe(started - created)
            return
        if event not in RUN_OUTCOMES or started is None:
            return
        if event == "retried":
            # a worker's retry stores the attempt's end as updated_at; a manual
            # `qo retry` of a dead task (attempt reset to 0) ran nothing
            if getattr(task, "attempt", 0) < 1:
                return
            ended = getattr(task, "updated_at", None)
        else:
            ended = getattr(task, "finished_at", None)
        if ended is not None and ended >= started:
            self._child(self.run_seconds, task_type, event).observe(ended - started)

    def exposition(self) -> str:
        """The registry in Prometheus text format (what the HTTP endpoint serves)."""
        return prometheus_client.generate_latest(self.registry).decode()


#: the process's metrics: what the plugin records and ``--metrics-port`` serves
METRICS = Metrics()


def serve(port: int, addr: str = "127.0.0.1", metrics: Metrics = METRICS) -> Any:
    """Serve ``metrics`` at ``http://addr:port/metrics`` from a daemon thread."""
    server = prometheus_client.start_http_server(port, addr=addr, registry=metrics.registry)
    metrics.served = True  # from now on a worker's start also starts the queue gauges
    return server
