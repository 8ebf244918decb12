"""``qo submit``, ``qo status``, ``qo list``, ``qo cancel`` and ``qo retry`` (one task, or in bulk)."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import time
from typing import Any

import click

from ..aging import task_effective_priority
from ..backends import redact_url
from ..bulk import CANCELLABLE
from ..errors import InvalidInput, TaskNotFound
from ..model import (CANCELLED, EXPIRED, FAILED, PRIORITY_LEVELS, RUNNING, STATUSES, Task, check_task_id,
                     check_task_type, iso)
from ..payloads import human_size
from ..stored import MAX_VALUE_DEPTH
from .common import echo_json, open_queue, queue_options, run, say_if_no_objects, say_skipped
from .parsing import MAX_GRAPH_BYTES, delay_to_time, parse_duration, parse_json_input, parse_time

json_option = click.option("--json", "as_json", is_flag=True, help="Print the task as one JSON object.")


@click.command()
@click.argument("task_type", metavar="TYPE")
@click.option("--input", "input_text", metavar="JSON|@FILE",
              help="The task's input as JSON; @path reads a file, @- standard input.")
@click.option("--priority", default=None, metavar="N|NAME",
              help=f"0-255 (higher runs first) or one of {', '.join(PRIORITY_LEVELS)} "
                   "[default: the queue's setting, else normal].")
@click.option("--at", "at_text", metavar="TIME", help="Not before this ISO-8601 time (with Z or an offset), or 'now'.")
@click.option("--delay", "delay_text", metavar="DURATION", help="Not before this long from now: 30, 10s, 5m, 2h, 1d.")
@click.option("--expires-in", "expires_in_text", metavar="DURATION",
              help="Expire (end 'expired', never run) if not started within this long from now: 10m, 2h.")
@click.option("--expires-at", "expires_at_text", metavar="TIME",
              help="Expire (end 'expired', never run) if not started by this ISO-8601 time (with Z or an offset).")
@click.option("--max-retries", type=int, default=None,
              help="Retries after the first attempt [default: the queue's setting, else 3].")
@click.option("--timeout", "timeout_seconds", type=float, default=None,
              help="Seconds an attempt may run [default: the queue's setting, else 300].")
@click.option("--idempotency-key", metavar="KEY",
              help="Submitting the same key again (in its scope) returns the same task.")
@click.option("--idempotency-scope", default="task_type", show_default=True, metavar="SCOPE",
              help="task_type, queue or custom:NAME.")
@click.option("--idempotency-ttl-days", type=float, default=7.0, show_default=True,
              help="How long the key names its task.")
@click.option("--rate-limit-key", metavar="KEY", help="Put the task under the key:KEY (or key:*) limit.")
@click.option("--depends-on", "depends_on", multiple=True, metavar="ID",
              help="Run only after this task completed (repeatable).")
@click.option("--on-dependency-failure", default="fail", show_default=True,
              type=click.Choice(["fail", "skip", "run"]),
              help="What a failed or cancelled dependency does to this task.")
@json_option
@queue_options
@run
async def submit(task_type: str, input_text: str | None, priority: str | None, at_text: str | None,
                 delay_text: str | None, expires_in_text: str | None, expires_at_text: str | None,
                 max_retries: int | None, timeout_seconds: float | None,
                 idempotency_key: str | None, idempotency_scope: str, idempotency_ttl_days: float,
                 rate_limit_key: str | None, depends_on: tuple[str, ...], on_dependency_failure: str,
                 as_json: bool, url: str, queue_name: str) -> None:
    """Submit a task of TYPE; prints its id."""
    if at_text is not None and delay_text is not None:
        raise click.UsageError("--at and --delay cannot be used together")
    if expires_in_text is not None and expires_at_text is not None:
        raise click.UsageError("--expires-in and --expires-at cannot be used together")
    # Everything that can be checked offline is checked before connecting.
    payload = parse_json_input(input_text, "--input")
    at = parse_time(at_text, "--at") if at_text is not None else None
    delay = parse_duration(delay_text, "--delay") if delay_text is not None else None
    expires_option = "--expires-in" if expires_in_text is not None else "--expires-at"
    expires_at = parse_time(expires_at_text, "--expires-at") if expires_at_text is not None else None
    expires_in = parse_duration(expires_in_text, "--expires-in") if expires_in_text is not None else None
    if expires_in is not None and expires_in <= 0:
        raise InvalidInput("--expires-in", f"{expires_in_text!r} is not a positive duration")
    check_task_type(task_type)  # before connecting: a fresh --url is not even created
    async with await open_queue(url, queue_name) as queue:
        schedule_at = at if delay is None else delay_to_time(delay, queue.clock.now(), "--delay")
        if expires_in is not None:
            expires_at = delay_to_time(expires_in, queue.clock.now(), "--expires-in")
        try:
            task = await queue.submit(task_type, payload, priority=priority, schedule_at=schedule_at,
                                      max_retries=max_retries, timeout_seconds=timeout_seconds,
                                      idempotency_key=idempotency_key, idempotency_scope=idempotency_scope,
                                      idempotency_ttl_days=idempotency_ttl_days,
                                      depends_on=list(depends_on), on_dependency_failure=on_dependency_failure,
                                      rate_limit_key=rate_limit_key, expires_at=expires_at)
        except InvalidInput as exc:  # name the option the user typed (in the past, before --at)
            if exc.field != "expires_at":
                raise
            raise InvalidInput(expires_option, exc.message) from None
    if as_json:
        echo_json(task.public_dict())
    else:
        click.echo(task.id)


@click.command()
@click.argument("task_id", metavar="ID")
@click.option("--payloads", is_flag=True,
              help="Also read and print an input or output stored apart (over 64 KiB; one GET each).")
@json_option
@queue_options
@run
async def status(task_id: str, payloads: bool, as_json: bool, url: str, queue_name: str) -> None:
    """Show one task: state, attempts, times, last error and output."""
    check_task_id(task_id)
    values: dict[str, Any] = {}
    async with await open_queue(url, queue_name) as queue:
        try:
            task = await queue.get(task_id)
        except TaskNotFound as exc:
            await say_if_no_objects(queue)
            raise _not_here(exc, queue) from None
        effective = task_effective_priority(queue.plugins, task, queue.clock.now())
        if payloads:
            for which in ("input", "output"):
                if getattr(task, f"{which}_ref") is not None:
                    values[which] = await queue.payload(task, which)
    if as_json:
        echo_json({**task.public_dict(), **values, "effective_priority": effective})
        return
    for label, value in describe(task, effective, values):
        click.echo(f"{label + ':':<11} {value}")


def _not_here(exc: TaskNotFound, queue: Any) -> TaskNotFound:
    """The same error, saying where qo looked (a wrong --queue or --url is the usual cause)."""
    err = TaskNotFound(exc.task_id)
    err.args = (f"{exc} in queue {queue.name!r} at {redact_url(queue.url)}",)
    return err


def describe(task: Task, effective: int | None = None,
             values: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """The (label, value) lines of ``qo status`` for ``task``; unset fields are left out.
    ``effective``: the priority a pending task competes at now (after aging); ``values``:
    the input or output stored apart, read (``--payloads``), else only their size shows."""
    values = values or {}
    state = task.status + (" (cancel requested)" if task.cancel_requested and task.status == RUNNING else "")
    lines = [
        ("id", task.id),
        ("type", task.task_type),
        ("status", state),
        ("priority", str(task.priority) + (f" (effective {effective})"
                                           if effective is not None and task.status == "pending" else "")),
        ("attempt", f"{task.attempt}/{task.max_retries + 1}"),
        ("timeout", f"{task.timeout_seconds:g}s"),
    ]
    for label, ts in (("created", task.created_at), ("available", task.available_at),
                      ("started", task.started_at), ("finished", task.finished_at),
                      ("expires", task.expires_at)):
        if ts is not None:
            lines.append((label, iso(ts)))
    if task.worker_id:
        lines.append(("worker", task.worker_id))
    if task.depends_on:
        lines.append(("depends on", ", ".join(task.depends_on) + f" (if one fails: {task.on_dependency_failure})"))
    if task.status == "blocked":
        lines.append(("waiting on", ", ".join(task.waiting_on)))
    if task.last_error:
        err = task.last_error
        where = f" (attempt {err['attempt']})" if err.get("attempt") is not None else ""
        lines.append(("last error", f"{err.get('type', 'Error')}: {err.get('message', '')}{where}"))
    for which in ("input", "output"):
        ref = getattr(task, f"{which}_ref")
        if which in values:
            lines.append((which, _compact(values[which])))
        elif ref is not None:
            lines.append((which, f"{human_size(ref['bytes'])} stored apart "
                                 f"(qo status {task.id} --payloads to print it)"))
        elif getattr(task, which) is not None or (which == "output" and task.status == "completed"):
            lines.append((which, _compact(getattr(task, which))))
    return lines


def _since(text: str | None) -> Any:
    """--since: a duration back from now (1h, 2d) or an ISO time."""
    if text is None:
        return None
    try:
        return dt.timedelta(seconds=parse_duration(text, "--since"))
    except InvalidInput:
        pass
    try:
        return parse_time(text, "--since")
    except InvalidInput:
        raise InvalidInput("--since", f"{text[:60]!r} is neither an age (30m, 1h, 2d) nor an ISO-8601 time "
                           "(2030-01-02T03:04:05Z)") from None


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@click.command("list")
@click.option("--status", "status_filter", type=click.Choice(STATUSES), help="Only tasks in this state.")
@click.option("--type", "task_type", metavar="T", help="Only tasks of this type.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="At most N tasks (0: all).")
@click.option("--newest-first", is_flag=True, help="Newest first (default: oldest first).")
@click.option("--since", metavar="AGE|TIME",
              help="Only tasks created (failed/cancelled/skipped/expired: ended) since then: 1h, 2d, or an ISO time.")
@click.option("--page-size", type=click.IntRange(1, 500), default=None, metavar="N",
              help="With --newest-first: one page of N tasks at a bounded cost, then the command for the next.")
@click.option("--after", metavar="CURSOR", help="With --newest-first: the page after CURSOR (printed after a page; --url is left out of that line when it holds credentials or query values).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@queue_options
@run
async def list_tasks(status_filter: str | None, task_type: str | None, limit: int, newest_first: bool,
                     since: str | None, page_size: int | None, after: str | None, as_json: bool, url: str,
                     queue_name: str) -> None:
    """List tasks, oldest first. Each status is read from its own index: the cost follows
    the rows shown (completed tasks have none: bound that listing with --since).

    With --page-size or --after (and --newest-first): one page, newest first, at a
    bounded cost (at most 24 LISTs and 200 GETs, or N if larger); the command for the
    next page follows on stderr ("more: qo list ... --after CURSOR")."""
    paged = page_size is not None or after is not None
    if paged and not newest_first:
        raise click.UsageError("--page-size and --after page newest first: add --newest-first")
    if paged and click.get_current_context().get_parameter_source("limit") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--limit and --page-size cannot be used together (a page holds --page-size tasks)")
    rows: list[tuple[Task, int]] = []
    when = _since(since)
    more = False
    next_cursor: str | None = None
    async with await open_queue(url, queue_name) as queue:
        before = queue.store.bad.count
        shown = 0
        if paged:
            page = await queue.page(status_filter, task_type, when, after=after, limit=page_size or 50)
            next_cursor, limit = page.next_cursor, 0
            found: Any = _each_task(page.tasks)
        else:
            found = queue.list(status=status_filter, task_type=task_type, limit=limit + 1 if limit else None,
                               newest_first=newest_first, since=when)
        async for task in found:
            if limit and shown >= limit:
                more = True  # one more than asked: say so, do not show it
                break
            shown += 1
            effective = task_effective_priority(queue.plugins, task, queue.clock.now())
            if as_json:  # stream: a long listing shows progress
                echo_json({**task.public_dict(), "effective_priority": effective})
            else:
                rows.append((task, effective))
        say_skipped(queue, before)
        empty = not rows and not shown and await say_if_no_objects(queue)
    if more:
        click.echo(f"more tasks match than the {limit} shown (use --limit, --since or --newest-first)", err=True)
    if not as_json:
        if not rows:
            if not empty:
                click.echo("no tasks", err=True)
        else:
            _table(rows)
    if next_cursor is not None:
        command = _next_page_command(status_filter, task_type, since, page_size, url, queue_name, next_cursor)
        click.echo(f"more: {command}", err=True)


async def _each_task(tasks: list[Task]) -> Any:
    for task in tasks:
        yield task


def _next_page_command(status: str | None, task_type: str | None, since: str | None, page_size: int | None,
                       url: str | None, queue_name: str | None, cursor: str) -> str:
    """The ``qo list`` that shows the next page (``--url`` only when it holds no secret)."""
    args = ["qo", "list", "--newest-first"]
    for option, value in (("--status", status), ("--type", task_type), ("--since", since),
                          ("--page-size", page_size), ("--queue", queue_name)):
        if value is not None:
            args += [option, str(value)]
    if url is not None and redact_url(url) == url:
        args += ["--url", url]
    return " ".join(shlex.quote(a) for a in args + ["--after", cursor])


def _table(rows: list[tuple[Task, int]]) -> None:
    table = [("ID", "TYPE", "STATUS", "PRIORITY", "ATTEMPT", "UPDATED")]
    # PRIORITY: the task's own; "0->160" when aging has it competing higher now
    table += [(t.id, t.task_type, t.status, str(t.priority) + (f"->{e}" if e != t.priority else ""),
               f"{t.attempt}/{t.max_retries + 1}", iso(t.updated_at)) for t, e in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


async def _change(task_id: str, url: str, queue_name: str, action: str, **options: Any) -> Task:
    """Run ``queue.cancel`` or ``queue.retry`` on one task, saying where qo looked if it is not there."""
    check_task_id(task_id)
    async with await open_queue(url, queue_name) as queue:
        try:
            return await getattr(queue, action)(task_id, **options)
        except TaskNotFound as exc:
            raise _not_here(exc, queue) from None


class _Progress:
    """``progress(done, listed)`` for a bulk action: a line on stderr every 100 tasks
    changed or every half second, whichever comes first."""

    def __init__(self, verb: str):
        self.verb = verb
        self.last = time.monotonic()

    def __call__(self, done: int, listed: int) -> None:
        now = time.monotonic()
        if done % 100 == 0 or now - self.last >= 0.5:
            self.last = now
            click.echo(f"{self.verb} {done} of {listed} listed...", err=True)


def _bulk_usage(task_id: str | None, bulk: str | None, what: str, extras: dict[str, Any]) -> None:
    """ID and a bulk flag (``what``) exclude each other, and one is needed; the bulk
    filters (``extras``, given ones non-empty) need the bulk flag. A UsageError (exit 2)."""
    if task_id is not None and bulk is not None:
        raise click.UsageError(f"give a task ID or {what}, not both")
    if task_id is None and bulk is None:
        raise click.UsageError(f"give a task ID, or {what} to act on many")
    if task_id is not None:
        given = [opt for opt, value in extras.items() if value]
        if given:
            raise click.UsageError(f"{given[0]} goes with {what}, not with a task ID")


def _plural(n: int) -> str:
    return f"{n} task{'s' if n != 1 else ''}"


@click.command()
@click.argument("task_id", metavar="[ID]", required=False)
@click.option("--status", "bulk_status", type=click.Choice(CANCELLABLE),
              help="Instead of ID: cancel every task in this state (running: ask each to stop; "
                   "failed: give the dead letters up, they end cancelled).")
@click.option("--type", "task_type", metavar="T", help="With --status: only tasks of this type.")
@click.option("--since", metavar="AGE|TIME", help="With --status: only tasks created since then: 1h, 2d, an ISO time.")
@click.option("--yes", is_flag=True, help="With --status and no --type: yes, every type.")
@click.option("--terminate", is_flag=True,
              help="With ID of a running task: cancel its async handler (asyncio cancellation) once its "
                   "worker hears of it (its next heartbeat); the task ends cancelled. A sync handler "
                   "cannot be interrupted: it sees ctx.cancel_requested.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the task (with --status: {\"cancelled\": N}) as one JSON object.")
@queue_options
@run
async def cancel(task_id: str | None, bulk_status: str | None, task_type: str | None, since: str | None,
                 yes: bool, terminate: bool, as_json: bool, url: str, queue_name: str) -> None:
    """Cancel a pending or blocked task; a running one is asked to stop; a failed one (a dead
    letter) is given up on and ends cancelled. Prints the new status.

    With --status pending|blocked (and no ID): cancel every such task, --type T only, or
    all types with --yes (a guard against emptying the queue by accident); a cancelled
    dependency fails, skips or runs its dependents by their policy. With --status
    running: ask every running task to stop. Progress goes to stderr; the last line
    says how many changed. Cost: the listing of that status plus 4-5 requests a task.
    """
    _bulk_usage(task_id, bulk_status, "--status", {"--type": task_type, "--since": since, "--yes": yes})
    if terminate and task_id is None:
        raise click.UsageError("--terminate takes the ID of one running task")
    if task_id is None:
        if task_type is None and not yes:
            raise click.UsageError(f"--status {bulk_status} without --type cancels {bulk_status} tasks of "
                                   "every type: add --yes to mean it, or --type T")
        await _cancel_many(bulk_status, task_type, since, as_json, url, queue_name)
        return
    task = await _change(task_id, url, queue_name, "cancel", terminate=terminate)
    if as_json:
        echo_json(task.public_dict())
    elif task.status == RUNNING and terminate:
        click.echo(f"terminate requested: {task.id} is running; its worker cancels an async handler at its "
                   "next heartbeat and the task ends cancelled")
    elif task.status == RUNNING:
        click.echo(f"cancel requested: {task.id} is running; its handler sees ctx.cancel_requested at its "
                   "worker's next heartbeat, and the task ends cancelled unless this attempt completes")
    else:
        click.echo(task.status)


async def _cancel_many(status: str, task_type: str | None, since: str | None, as_json: bool, url: str,
                       queue_name: str) -> None:
    when = _since(since)  # checked offline, before connecting
    if task_type is not None:
        check_task_type(task_type)
    verb, key = ("cancel requested for", "cancel_requested") if status == RUNNING else ("cancelled", "cancelled")
    async with await open_queue(url, queue_name) as queue:
        before = queue.store.bad.count
        n = await queue.cancel_many(status, task_type, when, progress=_Progress(verb))
        say_skipped(queue, before)
    if as_json:
        echo_json({key: n})
    else:
        click.echo(f"{verb} {_plural(n)}")


@click.command()
@click.argument("task_id", metavar="[ID]", required=False)
@click.option("--all-failed", is_flag=True, help="Instead of ID: retry every failed task (dead letter).")
@click.option("--all-cancelled", is_flag=True, help="Instead of ID: retry every cancelled task.")
@click.option("--all-expired", is_flag=True, help="Instead of ID: retry every expired task.")
@click.option("--type", "task_type", metavar="T", help="With --all-*: only tasks of this type.")
@click.option("--since", metavar="AGE|TIME", help="With --all-*: only tasks that ended since then: 1h, 2d, an ISO time.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the task (with --all-*: {\"retried\": N}) as one JSON object.")
@queue_options
@run
async def retry(task_id: str | None, all_failed: bool, all_cancelled: bool, all_expired: bool,
                task_type: str | None, since: str | None, as_json: bool, url: str, queue_name: str) -> None:
    """Put a failed (dead-lettered), cancelled or expired task back to pending. Prints the new status.

    With --all-failed (--all-cancelled, --all-expired) and no ID: retry every such task,
    --type T and --since D narrowing them. Progress goes to stderr; the last line says
    how many were retried. Cost: the listing of that status plus 4 requests a task.
    """
    chosen = [status for status, flag in ((FAILED, all_failed), (CANCELLED, all_cancelled),
                                          (EXPIRED, all_expired)) if flag]
    if len(chosen) > 1:
        raise click.UsageError(f"--all-{chosen[0]} and --all-{chosen[1]} cannot be used together")
    bulk = chosen[0] if chosen else None
    _bulk_usage(task_id, bulk, "--all-failed (--all-cancelled, --all-expired)",
                {"--type": task_type, "--since": since})
    if task_id is None:
        when = _since(since)  # checked offline, before connecting
        if task_type is not None:
            check_task_type(task_type)
        async with await open_queue(url, queue_name) as queue:
            before = queue.store.bad.count
            n = await queue.retry_many(bulk, task_type, when, progress=_Progress("retried"))
            say_skipped(queue, before)
        if as_json:
            echo_json({"retried": n})
        else:
            click.echo(f"retried {_plural(n)}")
        return
    task = await _change(task_id, url, queue_name, "retry")
    if as_json:
        echo_json(task.public_dict())
    else:
        click.echo(task.status)


@click.command("submit-graph")
@click.argument("graph_text", metavar="JSON|@FILE")
@json_option
@queue_options
@run
async def submit_graph(graph_text: str, as_json: bool, url: str, queue_name: str) -> None:
    """Submit tasks that depend on each other by local names; prints 'name id' lines.

    The graph is a JSON object: {"name": {"task_type": "...", "input": ..., "depends_on":
    ["other name or task id", ...], "priority": ..., "expires_at": "ISO time"}, ...}.
    Times (schedule_at, expires_at) are ISO-8601 with Z or an offset. A cycle is
    refused, spelled out.
    """
    # many tasks' inputs, each two levels down ({"name": {"input": ...}}): larger bounds
    nodes = parse_json_input(graph_text, "JSON", limit=MAX_GRAPH_BYTES, depth=MAX_VALUE_DEPTH + 2)
    if isinstance(nodes, dict):  # JSON has no datetimes: times are ISO strings
        for name, spec in nodes.items():
            for field in ("schedule_at", "expires_at"):
                if isinstance(spec, dict) and isinstance(spec.get(field), str):
                    spec[field] = parse_time(spec[field], f"nodes[{name}].{field}")
    async with await open_queue(url, queue_name) as queue:
        tasks = await queue.submit_graph(nodes)
    if as_json:
        echo_json({name: t.public_dict() for name, t in tasks.items()})
    else:
        for name, t in tasks.items():
            click.echo(f"{name} {t.id} {t.status}")
