"""``qo worker``: run the handlers defined in some modules against a queue."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import Counter
from typing import Any

import click

from ..errors import ConfigurationError, QoError
from ..handlers import Registry, import_handlers
from ..config import load as load_config
from .common import open_queue, queue_options, run
from .logs import configure, location, log_options

@click.command()
@click.argument("modules", metavar="MODULE...", nargs=-1, required=True)
@click.option("--concurrency", type=int, help="Tasks run at once (default: QO_CONCURRENCY, qo.toml, else 8).")
@click.option("--until-idle", is_flag=True,
              help="Exit once no task of a handled type is pending, blocked or running (drain the queue).")
@click.option("--poll-max", type=float, help="Longest pause between polls while idle, in seconds.")
@click.option("--lease-ttl", type=float, help="Seconds after which a silent worker is presumed dead.")
@log_options
@click.option("--shutdown-timeout", type=click.FloatRange(min=0.001), default=None,
              help="On SIGTERM/SIGINT, seconds running tasks get to finish before async handlers are "
                   "cancelled and handed back (sync handlers are waited for; a second signal exits "
                   "at once).  [default: 30]")
@click.option("--with-scheduler", is_flag=True,
              help="Also fire the queue's recurring schedules (as `qo schedule run` does), stopping with the worker.")
@queue_options
@run
async def worker(modules: tuple[str, ...], concurrency: int | None, until_idle: bool, poll_max: float | None,
                 lease_ttl: float | None, shutdown_timeout: float | None, log_level: str, log_format: str | None,
                 with_scheduler: bool,
                 url: str, queue_name: str) -> None:
    """Run the handlers defined in MODULE (a dotted module name or a path/to/file.py)."""
    from ..scheduler import Scheduler
    from ..worker import Worker

    config = configure(log_level, log_format, load_config().with_flags(
        concurrency=concurrency, poll_max=poll_max, lease_ttl=lease_ttl, shutdown_timeout=shutdown_timeout))
    registry = load_registry(list(modules))
    concurrency = config["concurrency"]
    overrides: dict[str, Any] = {name: config[name] for name in
                                 ("poll_max", "lease_ttl", "shutdown_timeout", "storage_failure_limit")}
    async with await open_queue(url, queue_name, patient=True) as queue:
        w = Worker(queue, concurrency=concurrency, **overrides)
        w.add_handlers(registry)
        logging.getLogger("qo.cli").info(
            "worker %s on queue %r at %s: concurrency %d, handlers: %s%s", w.worker_id, queue.name,
            location(queue.url), w.settings.concurrency,
            ", ".join(sorted(registry.handlers)), " (until idle)" if until_idle else "")
        stop_scheduler = asyncio.Event()
        scheduling = asyncio.ensure_future(Scheduler(queue).run(stop_scheduler)) if with_scheduler else None
        try:
            stats = await w.run(until_idle=until_idle)
        finally:
            stop_scheduler.set()  # the worker stopped (signal, idle or error): so does its scheduler
            if scheduling is not None:
                await scheduling
    if config["log_format"] == "json":  # every line of a json log parses
        logging.getLogger("qo.cli").info(summary(w.worker_id, stats), extra={
            "event": "stopped", "worker_id": w.worker_id, "queue": w.queue.name})
    else:
        click.echo(summary(w.worker_id, stats), err=True)
    if w.forced:  # a second signal: handler threads may still run; do not wait for them
        sys.stderr.flush()
        os._exit(1)


def load_registry(modules: list[str]) -> Registry:
    """Import ``modules`` and return their handlers; an import failure or no handler is an error.

    A ``.py`` file's directory goes on ``sys.path`` first (as ``python file.py`` does),
    so it can import its sibling modules.
    """
    for name in modules:
        if name.endswith(".py"):
            folder = os.path.dirname(os.path.abspath(name))
            if folder not in sys.path:
                sys.path.insert(0, folder)
    try:
        registry = import_handlers(modules)
    except QoError:
        raise
    except (ImportError, OSError, SyntaxError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot import handlers from {' '.join(modules)}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    if not registry.handlers:
        raise ConfigurationError(f"no handlers found in {' '.join(modules)} (decorate functions with "
                                 "@qo.handlers.handler(\"type\") or define a module-level qo.Worker)")
    return registry


def summary(worker_id: str, stats: Counter[str]) -> str:
    """One line: what the worker did, busiest counters first."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.items(), key=lambda kv: (-kv[1], kv[0])) if v)
    return f"worker {worker_id} stopped: {counts or 'nothing done'}"
