"""How a worker polls, leases, sweeps and shuts down: ``WorkerSettings``.

A setting the queue's shared settings set (qo/queue_settings.py) is replaced by the
queue's value while the worker runs; ``Worker.own_settings`` keeps these.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from . import keys
from .aging import AgingSettings, to_aging_settings
from .errors import InvalidInput
from .model import _short
from .queue import ORPHAN_GRACE_SECONDS
from .queue_settings import REFRESH_SECONDS


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidInput(attribute.name, f"{value!r} must be a positive, finite number")


@attrs.define
class WorkerSettings:
    """How a worker polls, leases and shuts down. Every interval is in seconds."""

    concurrency: int = attrs.field(default=8, validator=_positive)
    #: idle polling backs off from poll_min to poll_max (with jitter) while nothing is due
    poll_min: float = attrs.field(default=0.05, validator=_positive)
    poll_max: float = attrs.field(default=5.0, validator=_positive)
    #: a worker whose record is older than this is presumed dead; its tasks are requeued
    lease_ttl: float = attrs.field(default=30.0, validator=_positive)
    #: default lease_ttl / 3
    heartbeat_interval: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    #: how often this worker looks for dead workers (jittered 0.5x-1.5x)
    sweep_interval: float = attrs.field(default=10.0, validator=_positive)
    #: ready markers per LIST; default max(4 * concurrency, 32)
    list_limit: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    #: listed candidates older than this are listed again (newer, more urgent work)
    buffer_max_age: float = attrs.field(default=2.0, validator=_positive)
    delete_batch: int = attrs.field(default=200, validator=_positive)
    #: backpressure "wait" sleeps a slot at most this long for a token (else: delay)
    rate_limit_max_wait: float = attrs.field(default=2.0, validator=_positive)
    #: how often limit definitions are re-read
    limits_refresh: float = attrs.field(default=5.0, validator=_positive)
    #: how often this worker looks for dependents whose wake-up was lost (a page of edges)
    dependency_sweep_interval: float = attrs.field(default=60.0, validator=_positive)
    #: how often this worker deletes the idempotency records whose expiry markers are due
    #: (sooner while a page of 1000 is due); records from before the expiry index are
    #: scanned, a page of 100, every 12 intervals
    idempotency_sweep_interval: float = attrs.field(default=300.0, validator=_positive)
    #: how often finished tasks past their retention are deleted (one pass per interval
    #: on the queue, shared by its workers; qo/retention.py)
    retention_interval: float = attrs.field(default=3600.0, validator=_positive)
    #: how often the queue's shared settings (qo.queue_settings) are read again
    queue_settings_refresh: float = attrs.field(default=REFRESH_SECONDS, validator=_positive)
    #: aging of waiting due tasks (see qo.aging); True/False: the QO_AGING* settings, on/off
    aging: AgingSettings = attrs.field(factory=AgingSettings.from_env, converter=to_aging_settings)
    #: on SIGTERM/SIGINT, running tasks get this long to finish; then async handlers are
    #: cancelled and handed back, sync ones waited for (their leases renewed)
    shutdown_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: ``run(until_idle=True)`` gives up (raising StorageError) once storage has kept
    #: failing this long; a daemon worker keeps trying, with capped backoff
    storage_failure_limit: float = attrs.field(default=60.0, validator=_positive)
    #: a worker started while the store does not answer (``StorageUnavailable``) waits
    #: for it, 1 s doubling to 30 s; it gives up (raising StorageUnavailable) after this
    #: long, or never when None. Any other error at start-up ends ``run`` at once
    startup_timeout: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    #: while busy, one summary line (tasks/s, outcomes, running) per this many seconds
    #: (qo/worker_log.py); nothing is said for an interval in which no task started or ended
    log_summary_interval: float = attrs.field(default=10.0, validator=_positive)
    orphan_grace: float = attrs.field(default=ORPHAN_GRACE_SECONDS, validator=_positive)
    worker_id: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.list_limit is not None and not isinstance(self.list_limit, int):
            raise InvalidInput("list_limit", f"{self.list_limit!r} must be a positive integer")
        if not isinstance(self.concurrency, int) or self.concurrency > 1024:
            raise InvalidInput("concurrency", f"{self.concurrency!r} must be an integer from 1 to 1024")
        if self.poll_max < self.poll_min:
            raise InvalidInput("poll_max", "must be >= poll_min")
        if self.worker_id is not None and (not isinstance(self.worker_id, str)
                                           or not keys.WORKER_ID.match(self.worker_id)):
            raise InvalidInput("worker_id", f"{_short(self.worker_id)} is not a worker id")

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_interval or self.lease_ttl / 3

    @property
    def listing(self) -> int:
        return min(1000, self.list_limit or max(4 * self.concurrency, 32))
