"""``qo settings [show] | set NAME=VALUE... | unset NAME...``: a queue's shared settings,
stored in the bucket so every worker and producer of the queue uses the same ones."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import click

from ..queue_settings import SPECS, TASK_DEFAULTS, check_names, check_settings, parse_assignment
from .common import echo_json, open_queue, queue_options, run


def _rows(values: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, spec in SPECS.items():
        if name in values:
            rows.append({"name": name, "value": values[name], "source": "queue", "help": spec.help})
        elif name in TASK_DEFAULTS:
            rows.append({"name": name, "value": TASK_DEFAULTS[name], "source": "built-in", "help": spec.help})
        else:
            rows.append({"name": name, "value": None, "source": "each worker's own", "help": spec.help})
    return rows


def _show(values: dict[str, Any], as_json: bool) -> None:
    if not as_json:
        click.echo(f"{'SETTING':<20} {'VALUE':<8} {'SOURCE':<18} MEANING")
    for row in _rows(values):
        if as_json:
            echo_json(row)
        else:
            value = "-" if row["value"] is None else row["value"]
            click.echo(f"{row['name']:<20} {str(value):<8} {row['source']:<18} {row['help']}")


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per setting.")
@queue_options
@click.pass_context
def settings(ctx: click.Context, as_json: bool, url: str | None, queue_name: str | None) -> None:
    """The queue's shared settings (in the bucket: every worker and producer uses them).

    A setting the queue sets wins over a worker's own (flags, environment, qo.toml); a task
    option given at submit wins over the queue's default. Changes reach every worker
    within 30 s. Without a subcommand: show them.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(show, as_json=as_json, url=url, queue_name=queue_name)


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per setting.")


async def _on_queue(url: str | None, queue_name: str | None, as_json: bool,
                    change: Callable[[Any], Awaitable[dict[str, Any]]]) -> None:
    """Open the queue, apply ``change`` to its settings, show what they are now."""
    async with await open_queue(url, queue_name) as queue:
        values = await change(queue.settings)
    _show(values, as_json)


@settings.command()
@json_option
@queue_options
@run
async def show(as_json: bool = False, url: str | None = None, queue_name: str | None = None) -> None:
    """Every queue setting: its value and whether the queue sets it."""
    await _on_queue(url, queue_name, as_json, lambda s: s.get(refresh=True))


@settings.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="NAME=VALUE...")
@json_option
@queue_options
@run
async def set_settings(assignments: tuple[str, ...], as_json: bool, url: str | None, queue_name: str | None) -> None:
    """Set settings, e.g. max_retries=5 poll_max=2 aging_cap=200 aging=off; others are kept."""
    for a in assignments:  # the shape is usage (exit 2); a bad value is reported (exit 1)
        if "=" not in a or not a.partition("=")[0].strip():
            raise click.BadParameter(f"{a!r} is not NAME=VALUE (e.g. max_retries=5)", param_hint="NAME=VALUE")
    changes = check_settings(dict(parse_assignment(a) for a in assignments))  # together, before connecting
    await _on_queue(url, queue_name, as_json, lambda s: s.set(changes))


@settings.command("unset")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@json_option
@queue_options
@run
async def unset_settings(names: tuple[str, ...], as_json: bool, url: str | None, queue_name: str | None) -> None:
    """Remove settings from the queue: each worker's own value (or the built-in) applies again."""
    check_names(names)  # before connecting
    await _on_queue(url, queue_name, as_json, lambda s: s.unset(*names))
