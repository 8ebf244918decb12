"""``qo purge``: delete finished tasks older than a bound (retention does it by itself)."""

from __future__ import annotations

import sys
import time

import click

from ..durations import format_duration, parse_duration
from ..errors import InvalidInput
from ..model import TERMINAL
from ..retention import check_purge, purge as purge_tasks
from .common import echo_json, open_queue, queue_options, run


@click.command()
@click.option("--status", required=True, type=click.Choice(sorted(TERMINAL)), help="Finished tasks of this status.")
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="That ended longer ago than this: 1d, 12h, 30m (at least 1m).")
@click.option("--type", "task_type", metavar="T", help="Only tasks of this type.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with the counts.")
@queue_options
@run
async def purge(status: str, older_than: str, task_type: str | None, dry_run: bool, yes: bool, as_json: bool,
                url: str, queue_name: str) -> None:
    """Delete finished tasks that ended longer ago than --older-than. Never a task whose
    idempotency key is alive or that a dependent waits on. Workers do this by themselves
    for each status's retention (qo settings set retention_completed=7d ...)."""
    seconds = parse_duration(older_than, "--older-than")
    try:
        check_purge(status, seconds, task_type)  # every check before anything is read
    except InvalidInput as exc:
        raise InvalidInput({"older_than": "--older-than", "task_type": "--type"}.get(exc.field, exc.field),
                           exc.message) from None
    what = f"{status} tasks" + (f" of type {task_type}" if task_type else "") + \
        f" that ended more than {format_duration(seconds)} ago"
    if not dry_run and not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("deleting needs --yes (or --dry-run to count) when not run from a terminal")
        click.confirm(f"delete {what}?", abort=True, err=True)
    shown = [0.0]

    def progress(deleted: int, examined: int) -> None:
        if not as_json and time.monotonic() - shown[0] >= 0.5:
            shown[0] = time.monotonic()
            click.echo(f"  {'would delete' if dry_run else 'deleted'} {deleted} of {examined} examined", err=True)

    async with await open_queue(url, queue_name) as queue:
        report = await purge_tasks(queue, status, seconds, task_type, dry_run=dry_run, progress=progress)
    if as_json:
        echo_json({"deleted": 0 if dry_run else report.deleted, "would_delete": report.deleted if dry_run else None,
                   "examined": report.examined, "kept": report.kept, "more": report.more})
        return
    verb = "would delete" if dry_run else "deleted"
    kept = ", ".join(f"{n} {why}" for why, n in sorted(report.kept.items()))
    click.echo(f"{verb} {report.deleted} {what}" + (f" (kept: {kept})" if kept else ""), err=True)
    if report.more:
        click.echo("more may qualify: this run read its limit of tasks; run it again", err=True)
