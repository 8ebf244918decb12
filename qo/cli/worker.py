"""``qo worker``: run the handlers defined in some modules against a queue."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import Counter
from typing import Any

import click

from ..errors import ConfigurationError
from ..handlers import Registry, import_handlers
from ..config import load as load_config
from .common import open_queue, run
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
@click.option("--startup-timeout", type=click.FloatRange(min=0.001), default=None, metavar="SECONDS",
              help="Started while the store does not answer, the worker waits for it (retrying 1 s doubling "
                   "to 30 s, saying so); give up after SECONDS with exit 1 (default: QO_STARTUP_TIMEOUT, "
                   "qo.toml, else wait for good). A bad URL or credentials exit at once.")
@click.option("--with-scheduler", is_flag=True,
              help="Also fire the queues' recurring schedules (as `qo schedule run` does), stopping with the worker.")
@click.option("--url", default=None,
              help="Storage URL: s3://bucket/prefix, file:///path or a path, sqlite:///path/queue.db "
                   "(default: QO_URL, qo.toml, else ./.qo).")
@click.option("--queue", "queue_specs", multiple=True, metavar="NAME[:WEIGHT]",
              help="A queue to work; repeat it for several under one --concurrency: in the order given "
                   "(a later queue gets the slots the earlier ones leave free), or NAME:WEIGHT on each to "
                   "share the slots by weight (emails:3 reports:1). Default: QO_QUEUE, qo.toml, else 'default'.")
@run
async def worker(modules: tuple[str, ...], concurrency: int | None, until_idle: bool, poll_max: float | None,
                 lease_ttl: float | None, shutdown_timeout: float | None, startup_timeout: float | None,
                 log_level: str, log_format: str | None, with_scheduler: bool, url: str, queue_specs: tuple[str, ...]) -> None:
    """Run the handlers defined in MODULE (a dotted module name or a path/to/file.py)."""
    from ..multi_worker import parse_queue_spec
    from ..scheduler import Scheduler
    from ..worker import Worker

    specs = [parse_queue_spec(s) for s in queue_specs] or [(None, None)]
    weighted = [w is not None for _, w in specs]
    if any(weighted) and not all(weighted):
        raise click.UsageError("--queue: give a weight to every queue (NAME:WEIGHT) or to none (strict order)")
    if len({n for n, _ in specs}) != len(specs):
        raise click.UsageError("--queue: a queue is given twice")
    config = configure(log_level, log_format, load_config().with_flags(
        concurrency=concurrency, poll_max=poll_max, lease_ttl=lease_ttl, shutdown_timeout=shutdown_timeout,
        startup_timeout=startup_timeout))
    registry = load_registry(list(modules))
    concurrency = config["concurrency"]
    overrides: dict[str, Any] = {name: config[name] for name in
                                 ("poll_max", "lease_ttl", "shutdown_timeout", "storage_failure_limit",
                                  "startup_timeout")}
    queues = []
    try:
        for name, _ in specs:
            queues.append(await open_queue(url, name, patient=True))
        if len(queues) == 1:
            w = Worker(queues[0], concurrency=concurrency, **overrides)
        else:
            weights = [wt for _, wt in specs] if all(weighted) else None
            w = Worker(queues, concurrency, weights=weights, **overrides)
        w.add_handlers(registry)
        order = (", ".join(f"{q.name!r}" + (f" (weight {wt})" if wt else "") for q, (_, wt) in zip(queues, specs))
                 + ("" if len(queues) == 1 or all(weighted) else " (in this order)"))
        logging.getLogger("qo.cli").info(
            "worker %s on queue%s %s at %s: concurrency %d, handlers: %s%s", w.worker_id,
            "s" if len(queues) > 1 else "", order, location(queues[0].url), w.settings.concurrency,
            ", ".join(sorted(registry.handlers)), " (until idle)" if until_idle else "")
        stop_scheduler = asyncio.Event()
        scheduling = [asyncio.ensure_future(Scheduler(q).run(stop_scheduler)) for q in queues] if with_scheduler else []
        try:
            stats = await w.run(until_idle=until_idle)
        finally:
            stop_scheduler.set()  # the worker stopped (signal, idle or error): so does its scheduler
            for s in scheduling:
                await s
    finally:
        for q in queues:
            await q.close()
    if config["log_format"] == "json":  # every line of a json log parses
        logging.getLogger("qo.cli").info(summary(w.worker_id, stats), extra={
            "event": "stopped", "worker_id": w.worker_id, "queue": ",".join(q.name for q in queues)})
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
    registry = import_handlers(modules)  # an error names the module and where it was raised
    if not registry.handlers:
        raise ConfigurationError(f"no handlers found in {' '.join(modules)} (decorate functions with "
                                 "@qo.handler(\"type\") or @qo.task(\"type\"), or define a module-level qo.Worker)")
    return registry


def summary(worker_id: str, stats: Counter[str]) -> str:
    """One line: what the worker did, busiest counters first."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.items(), key=lambda kv: (-kv[1], kv[0])) if v)
    return f"worker {worker_id} stopped: {counts or 'nothing done'}"
