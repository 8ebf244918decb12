"""``qo limit set|list|remove``: rate and concurrency limits of a queue."""

from __future__ import annotations

import click

from ..errors import InvalidInput
from ..limits import check_scope
from .common import echo_json, open_queue, queue_options, run, say_skipped

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> tuple[float, float]:
    """``10``, ``10/s``, ``100/m``, ``5/h`` -> (rate, per seconds)."""
    number, _, unit = text.strip().partition("/")
    try:
        rate = float(number)
    except ValueError:
        raise InvalidInput("--rate", f"{text!r} is not N, N/s, N/m or N/h") from None
    if unit and unit not in _UNITS:
        raise InvalidInput("--rate", f"{text!r}: the unit must be s, m or h")
    return rate, _UNITS[unit or "s"]


@click.group()
def limit() -> None:
    """Rate and concurrency limits, enforced across every worker."""


@limit.command("set")
@click.argument("scope")
@click.option("--rate", "rate_text", metavar="N[/s|/m|/h]", help="Starts per second (or minute, hour).")
@click.option("--burst", type=float, help="Starts allowed at once (default: the rate, at least 1).")
@click.option("--concurrency", type=int, help="At most this many running at once.")
@click.option("--backpressure", type=click.Choice(["delay", "wait", "skip"]), default="delay", show_default=True,
              help="A task with no token: back to delayed, wait in its slot (short waits), or skip for now.")
@queue_options
@run
async def set_limit(scope: str, rate_text: str | None, burst: float | None, concurrency: int | None,
                    backpressure: str, url: str, queue_name: str) -> None:
    """Set the limit of SCOPE: global, task_type:TYPE, key:KEY or key:* (each key its own bucket)."""
    rate, per = parse_rate(rate_text) if rate_text is not None else (None, 1.0)
    check_scope(scope)  # before connecting: a fresh --url is not even created
    async with await open_queue(url, queue_name) as queue:
        lim = await queue.limits.set(scope, rate, per, burst, concurrency=concurrency, backpressure=backpressure)
    click.echo(f"{lim.scope}: {describe(lim.to_dict())}")


@limit.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per limit.")
@queue_options
@run
async def list_limits(as_json: bool, url: str, queue_name: str) -> None:
    """Every limit with its current tokens and running count."""
    async with await open_queue(url, queue_name) as queue:
        before = queue.store.bad.count
        rows = await queue.limits.list()
        say_skipped(queue, before)
    if not rows:
        click.echo("no limits", err=True)
    elif not as_json:
        click.echo(f"{'SCOPE':<28} {'LIMIT':<40} NOW")
    for row in rows:
        if as_json:
            echo_json(row)
            continue
        now = []
        if row.get("tokens") is not None:
            now.append(f"tokens {row['tokens']:g}")
        if "running" in row and row.get("concurrency"):
            now.append(f"running {row['running']}/{row['concurrency']}")
        if "buckets" in row:
            now.append(f"{row['buckets']} key buckets")
        click.echo(f"{row['scope']:<28} {describe(row):<40} {', '.join(now)}")


@limit.command("remove")
@click.argument("scope")
@queue_options
@run
async def remove_limit(scope: str, url: str, queue_name: str) -> None:
    """Remove the limit of SCOPE."""
    check_scope(scope)
    async with await open_queue(url, queue_name) as queue:
        await queue.limits.remove(scope)
    click.echo(f"removed {scope}")


def describe(d: dict) -> str:
    parts = []
    if d.get("rate") is not None:
        parts.append(f"{d['rate']:g} per {d['per']:g}s, burst {d['burst'] if d['burst'] is not None else max(1, d['rate']):g}")
    if d.get("concurrency") is not None:
        parts.append(f"at most {d['concurrency']} running")
    parts.append(f"backpressure {d['backpressure']}")
    return "; ".join(parts)
