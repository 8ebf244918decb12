"""The hook implementations: task events feed the counters, a running worker refreshes the
queue gauges from ``queue.stats()``; ``qo worker`` gets ``--metrics-port``."""

from __future__ import annotations

import os
from typing import Any

import click

import qo

from .collectors import METRICS, serve

OPTION_NAME = "metrics_port"


@qo.hookimpl
def qo_task_event(event: str, task: qo.Task) -> None:
    METRICS.observe(event, task)


@qo.hookimpl
def qo_worker_started(worker: qo.Worker) -> None:
    # the qo_queue_* gauges, from queue.stats() snapshots: ~20 requests a minute, paid only
    # when someone reads them (--metrics-port) or asks (QO_METRICS_STATS_INTERVAL)
    if METRICS.served or os.environ.get("QO_METRICS_STATS_INTERVAL", "").strip():
        METRICS.refresher.start(worker)


@qo.hookimpl
def qo_worker_stopping(worker: qo.Worker) -> None:
    METRICS.refresher.stop(worker)


def _start_server(ctx: click.Context, param: click.Parameter, port: int | None) -> None:
    """Parameter callback: runs while the command line is parsed, before the command runs."""
    if port is None or ctx.resilient_parsing:
        return
    try:
        serve(port, addr="127.0.0.1")
    except OSError as exc:
        raise click.BadParameter(f"cannot serve metrics on 127.0.0.1:{port}: {exc}", ctx=ctx, param=param) from exc


def metrics_port_option() -> click.Option:
    return click.Option(
        ["--metrics-port", OPTION_NAME], type=click.IntRange(1, 65535), expose_value=False,
        callback=_start_server,
        help="Serve Prometheus metrics at http://127.0.0.1:PORT/metrics while the worker runs (qo-metrics).")


@qo.hookimpl
def qo_cli_commands(cli: click.Group) -> None:
    worker: Any = cli.commands.get("worker")
    if not isinstance(worker, click.Command):
        return
    if any(p.name == OPTION_NAME for p in worker.params):  # the CLI may be built more than once
        return
    worker.params.append(metrics_port_option())
