"""``qo schedule add|list|show|remove|pause|resume|trigger|run``: recurring schedules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

import click

from ..backends import redact_url
from ..errors import InvalidInput
from ..model import PRIORITY_LEVELS, iso
from ..schedule_model import CATCH_UP_POLICIES, Schedule, check_name
from .common import echo_json, open_queue, queue_options, run, say_skipped
from .logs import configure, location, log_options
from ..model import MAX_INPUT_BYTES
from .parsing import parse_json_input

json_option = click.option("--json", "as_json", is_flag=True, help="Print the schedule as one JSON object.")
#: field of an InvalidInput -> the option a user typed
OPTION_OF = {"cron": "--cron", "task_type": "--type", "input": "--input", "timezone": "--timezone",
             "catch_up": "--catch-up", "max_catch_up": "--max-catch-up", "grace_seconds": "--grace",
             "priority": "--priority", "max_retries": "--max-retries", "timeout_seconds": "--timeout"}


@click.group()
def schedule() -> None:
    """Recurring schedules: a task submitted at every time of a cron expression."""


@schedule.command()
@click.argument("name")
@click.option("--cron", required=True, metavar="EXPR",
              help="5 fields (minute hour day month weekday), or 6 with seconds last; or @daily ...")
@click.option("--type", "task_type", required=True, metavar="T", help="The task type each fire submits.")
@click.option("--input", "input_text", metavar="JSON|@FILE", help="The tasks' input as JSON; @path reads a file.")
@click.option("--timezone", default="UTC", show_default=True, metavar="TZ",
              help="IANA timezone the cron times are in (Europe/Berlin, America/New_York ...).")
@click.option("--catch-up", "catch_up", default="latest", show_default=True, metavar="POLICY",
              help=f"After downtime: {', '.join(CATCH_UP_POLICIES)} (skip: none of the missed times; latest: "
                   "the most recent once; all: every one, bounded by --max-catch-up).")
@click.option("--max-catch-up", type=int, default=100, show_default=True, help="Bound of --catch-up all.")
@click.option("--grace", "grace_seconds", type=float, default=60.0, show_default=True,
              help="Seconds late a fire time still counts as on time (fires whatever the policy).")
@click.option("--priority", default=None, metavar="N|NAME",
              help=f"0-255 or one of {', '.join(PRIORITY_LEVELS)} [default: the queue's setting, else normal].")
@click.option("--max-retries", type=int, default=None,
              help="Retries of each task [default: the queue's setting, else 3].")
@click.option("--timeout", "timeout_seconds", type=float, default=None,
              help="Seconds an attempt may run [default: the queue's setting, else 300].")
@click.option("--paused", is_flag=True, help="Create it paused (resume to start firing).")
@json_option
@queue_options
@run
async def add(name: str, cron: str, task_type: str, input_text: str | None, timezone: str, catch_up: str,
              max_catch_up: int, grace_seconds: float, priority: str | None, max_retries: int | None,
              timeout_seconds: float | None,
              paused: bool, as_json: bool, url: str, queue_name: str) -> None:
    """Add schedule NAME; prints its next fire time."""
    payload = parse_json_input(input_text, "--input", limit=MAX_INPUT_BYTES)  # kept inline in the schedule
    check_name(name)  # before connecting: a fresh --url is not even created
    async with await open_queue(url, queue_name) as queue:
        try:
            s = await queue.schedules.add(
                name, cron=cron, task_type=task_type, input=payload, timezone=timezone, catch_up=catch_up,
                max_catch_up=max_catch_up, grace_seconds=grace_seconds, priority=priority,
                max_retries=max_retries, timeout_seconds=timeout_seconds, enabled=not paused)
        except InvalidInput as exc:
            raise InvalidInput(OPTION_OF.get(exc.field, exc.field), exc.message) from None
    if as_json:
        echo_json(s.public_dict())
    else:
        state = "paused" if paused else f"next fire {s.local(s.next_fire_at)} ({iso(s.next_fire_at)})"
        click.echo(f"added {s.name}: {state}")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@queue_options
@run
async def list_schedules(as_json: bool, url: str, queue_name: str) -> None:
    """List schedules; next fire times in each schedule's timezone, then in UTC."""
    async with await open_queue(url, queue_name) as queue:
        before = queue.store.bad.count
        schedules = await queue.schedules.list()
        say_skipped(queue, before)
    if as_json:
        for s in schedules:
            echo_json(s.public_dict())
        return
    if not schedules:
        click.echo(f"no schedules in queue {queue.name!r} at {redact_url(queue.url)}", err=True)
        return
    table = [("NAME", "STATE", "CRON", "TIMEZONE", "NEXT (LOCAL)", "NEXT (UTC)", "TYPE", "LAST TASK")]
    table += [(s.name, _state(s), s.cron, s.timezone, s.local(s.next_fire_at) or "-",
               iso(s.next_fire_at) if s.next_fire_at is not None else "-", s.task_type, s.last_task_id or "-")
              for s in schedules]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def _state(s: Schedule) -> str:
    return "error" if s.last_error and not s.enabled else ("enabled" if s.enabled else "paused")


@schedule.command()
@click.argument("name")
@json_option
@queue_options
@run
async def show(name: str, as_json: bool, url: str, queue_name: str) -> None:
    """Show one schedule: definition and fire state."""
    async with await open_queue(url, queue_name) as queue:
        s = await queue.schedules.get(name)
    if as_json:
        echo_json(s.public_dict())
        return
    for label, value in describe(s):
        click.echo(f"{label + ':':<13} {value}")


def describe(s: Schedule) -> list[tuple[str, str]]:
    """The (label, value) lines of ``qo schedule show``."""
    lines = [("name", s.name), ("state", _state(s)), ("cron", s.cron), ("timezone", s.timezone),
             ("type", s.task_type), ("input", json.dumps(s.input, sort_keys=True, ensure_ascii=False)),
             ("options", ", ".join(f"{k}={v}" for k, v in sorted(s.task_options().items()))),
             ("catch-up", f"{s.catch_up} (max {s.max_catch_up}, grace {s.grace_seconds:g}s)")]
    for label, ts in (("next fire", s.next_fire_at), ("last fire", s.last_fire_at)):
        if ts is not None:
            lines.append((label, f"{s.local(ts)} ({iso(ts)})"))
    if s.last_task_id:
        lines.append(("last task", s.last_task_id))
    lines.append(("fired", str(s.fired)))
    if s.last_error:
        lines.append(("last error", s.last_error))
    return lines


def _simple(verb: str, method: str, help_text: str) -> click.Command:
    @click.argument("name")
    @json_option
    @queue_options
    @run
    async def command(name: str, as_json: bool, url: str, queue_name: str) -> None:
        check_name(name)
        async with await open_queue(url, queue_name) as queue:
            s = await getattr(queue.schedules, method)(name)
        if s is None:  # an unreadable schedule object, removed all the same
            echo_json({"name": name, "removed": True, "unreadable": True}) if as_json else \
                click.echo(f"{verb} {name} (its object was unreadable)")
        elif as_json:
            echo_json(s.public_dict())
        elif verb == "trigger":
            click.echo(s.id)
        else:
            click.echo(f"{verb} {s.name}" + (f": next fire {s.local(s.next_fire_at)}"
                                             if verb == "resumed" and s.next_fire_at is not None else ""))

    command.__doc__ = help_text
    return schedule.command(method)(command)


remove = _simple("removed", "remove", "Remove schedule NAME (a fire in flight may still finish).")
pause = _simple("paused", "pause", "Stop firing NAME until resumed; times passed meanwhile never fire.")
resume = _simple("resumed", "resume", "Fire NAME again, from its next time after now.")
trigger = _simple("trigger", "trigger", "Fire NAME once now (a new task); its cron times are unchanged. "
                  "Prints the task id.")


@schedule.command("run")
@click.option("--poll-max", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Longest pause between passes: new and changed schedules are seen within this.")
@log_options
@queue_options
@run
async def run_scheduler(poll_max: float, log_level: str, log_format: str | None, url: str, queue_name: str) -> None:
    """The scheduler daemon, until SIGTERM/SIGINT. Run any number, anywhere: every fire
    time still produces exactly one task."""
    from ..scheduler import Scheduler

    configure(log_level, log_format)
    queue = await open_queue(url, queue_name, patient=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        scheduler = Scheduler(queue, poll_max=poll_max)
        logging.getLogger("qo.cli").info("scheduler on queue %r at %s", queue.name, location(queue.url))
        stats: dict[str, Any] = dict(await scheduler.run(stop))
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await queue.close()
    click.echo(f"scheduler stopped: fired {stats.get('fired', 0)}, passes {stats.get('passes', 0)}, "
               f"errors {stats.get('errors', 0)}", err=True)
