"""``qo layout [show] | set --shards P``: how a queue's per-task keys are spread over
prefixes (qo/layout.py), recorded once, before the queue's first task."""

from __future__ import annotations

from typing import Any

import click

from ..errors import InvalidInput
from ..layout import SPREAD_KINDS, Layout, check_shards
from .common import echo_json, open_queue, queue_options, run


def _row(queue: Any, layout: Layout) -> dict[str, Any]:
    return {"queue": queue.name, "shards": layout.shards, "recorded": layout.recorded,
            "spread": [f"{queue.name}/{kind}/" for kind in SPREAD_KINDS] if layout.shards > 1 else []}


def _show(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(row)
        return
    if row["shards"] == 1:
        how = "recorded" if row["recorded"] else "no layout recorded"
        click.echo(f"queue {row['queue']!r}: flat ({how}): each kind of key under one prefix")
    else:
        click.echo(f"queue {row['queue']!r}: {row['shards']} shards: "
                   + ", ".join(f"{p}{{00..{row['shards'] - 1:02x}}}/" for p in row["spread"]))


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@queue_options
@click.pass_context
def layout(ctx: click.Context, as_json: bool, url: str | None, queue_name: str | None) -> None:
    """How the queue's per-task keys are spread over prefixes (S3 partitions).

    A queue is flat unless a layout was set: each kind of key (tasks/, packs/, ready/,
    delayed/) under one prefix, which S3 serves up to ~3,500 writes/s. `qo layout set
    --shards P` spreads them over P prefixes, before the queue's first task; it never
    changes after. Without a subcommand: show it (one GET).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(show, as_json=as_json, url=url, queue_name=queue_name)


@layout.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@queue_options
@run
async def show(as_json: bool = False, url: str | None = None, queue_name: str | None = None) -> None:
    """The queue's layout: flat, or how many shards."""
    async with await open_queue(url, queue_name) as queue:
        _show(_row(queue, await queue.layout(refresh=True)), as_json)


@layout.command("set")
@click.option("--shards", required=True, help="Prefixes per kind of key: 1, 2, 4, ... 256.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@queue_options
@run
async def set_layout(shards: str, as_json: bool, url: str | None, queue_name: str | None) -> None:
    """Spread the queue's keys over --shards prefixes (before its first task; never changed)."""
    try:
        count = check_shards(shards)  # before connecting
    except InvalidInput as exc:
        raise InvalidInput("--shards", exc.message) from None
    async with await open_queue(url, queue_name) as queue:
        try:
            recorded = await queue.set_layout(count)
        except InvalidInput as exc:
            raise InvalidInput("--shards", exc.message) from None
        _show(_row(queue, recorded), as_json)
