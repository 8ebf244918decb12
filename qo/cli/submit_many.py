"""``qo submit-many TYPE --input-lines @file.jsonl``: one task per line of JSON."""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Iterator

import click

from ..errors import InvalidInput, QoError
from ..model import MAX_INPUT_BYTES, PRIORITY_LEVELS, check_task_type
from ..queue import BulkSubmitError
from ..stored import MAX_VALUE_DEPTH, too_deep
from .common import echo_json, open_queue, queue_options, run
from .parsing import delay_to_time, parse_duration, parse_time

#: lines submitted per ``submit_many`` call: bounds what one failure can leave unsaid
CHUNK = 1000
#: at most this many lines in one run (all are read and checked before any is written)
MAX_LINES = 1_000_000


def _open_lines(source: str) -> tuple[IO[bytes], str]:
    if source in ("-", "@-"):
        return sys.stdin.buffer, "standard input"
    path = source[1:] if source.startswith("@") else source
    if not path:
        raise InvalidInput("--input-lines", "'@' must be followed by a file path, or '-' for standard input")
    try:
        return open(path, "rb"), f"file {path!r}"
    except OSError as exc:
        raise InvalidInput("--input-lines", f"cannot read {path!r}: {exc.strerror or exc}") from None


def read_inputs(stream: IO[bytes], source: str) -> list[Any]:
    """Every non-blank line of ``stream`` as a JSON value, each checked as a task input;
    ``InvalidInput`` naming ``--input-lines`` and the line number for the first bad one."""
    out: list[Any] = []
    for number, raw in enumerate(_bounded_lines(stream), start=1):
        if not raw.strip():
            continue
        where = f"--input-lines line {number}"
        if len(raw) > MAX_INPUT_BYTES + 1:
            raise InvalidInput(where, f"is larger than {MAX_INPUT_BYTES} bytes, a task input's limit")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(where, f"is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if too_deep(text, MAX_VALUE_DEPTH):
            raise InvalidInput(where, f"is nested more than {MAX_VALUE_DEPTH} levels deep")
        try:
            out.append(json.loads(text, parse_constant=_reject_constant))
        except ValueError as exc:
            raise InvalidInput(where, f"is not JSON: {exc}") from None
        if len(out) > MAX_LINES:
            raise InvalidInput("--input-lines", f"has more than {MAX_LINES} lines: split it")
    if not out:
        raise InvalidInput("--input-lines", f"{source} has no input lines")
    return out


def _bounded_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """Lines, each read at most a task input's limit + 2 bytes (a huge line is not held)."""
    while True:
        line = stream.readline(MAX_INPUT_BYTES + 2)
        if not line:
            return
        if len(line) > MAX_INPUT_BYTES + 1 and not line.endswith(b"\n"):
            yield line  # refused by the caller; the rest of that line is never read
            return
        yield line.rstrip(b"\r\n")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@click.command("submit-many")
@click.argument("task_type", metavar="TYPE")
@click.option("--input-lines", "source", required=True, metavar="@FILE|-",
              help="One task input per line, as JSON (JSON Lines); @path reads a file, - or @- "
                   "standard input. Every line is checked before any task is written.")
@click.option("--priority", default=None, metavar="N|NAME",
              help=f"0-255 or one of {', '.join(PRIORITY_LEVELS)} [default: the queue's setting, else normal].")
@click.option("--delay", "delay_text", metavar="DURATION", help="Not before this long from now: 30, 10s, 5m, 2h, 1d.")
@click.option("--at", "at_text", metavar="TIME", help="Not before this ISO-8601 time (with Z or an offset).")
@click.option("--max-retries", type=int, default=None, help="Retries after the first attempt.")
@click.option("--timeout", "timeout_seconds", type=float, default=None, help="Seconds an attempt may run.")
@click.option("--rate-limit-key", metavar="KEY", help="Put every task under the key:KEY (or key:*) limit.")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Submits in flight at once.")
@click.option("--bulk/--no-bulk", default=True, show_default=True,
              help="Write the tasks in packs of up to 256 (two requests a pack; each task keeps its id, "
                   "status and retries); --no-bulk: one object per task.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task instead of its id.")
@click.option("--quiet", is_flag=True, help="No progress bar on standard error.")
@queue_options
@run
async def submit_many(task_type: str, source: str, priority: str | None, delay_text: str | None,
                      at_text: str | None, max_retries: int | None, timeout_seconds: float | None,
                      rate_limit_key: str | None, concurrency: int, bulk: bool, as_json: bool, quiet: bool,
                      url: str, queue_name: str) -> None:
    """Submit one task of TYPE per line of --input-lines; prints the ids in line order."""
    if at_text is not None and delay_text is not None:
        raise click.UsageError("--at and --delay cannot be used together")
    check_task_type(task_type)
    at = parse_time(at_text, "--at") if at_text is not None else None
    delay = parse_duration(delay_text, "--delay") if delay_text is not None else None
    stream, where = _open_lines(source)
    try:
        inputs = read_inputs(stream, where)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    async with await open_queue(url, queue_name) as queue:
        schedule_at = at if delay is None else delay_to_time(delay, queue.clock.now(), "--delay")
        options = {k: v for k, v in dict(priority=priority, schedule_at=schedule_at, max_retries=max_retries,
                                         timeout_seconds=timeout_seconds, rate_limit_key=rate_limit_key).items()
                   if v is not None}
        queue.build_task(task_type, None, **options)  # the options, checked before anything is written
        show = not quiet and sys.stderr.isatty()
        with click.progressbar(length=len(inputs), label=f"submitting {len(inputs)} {task_type}",
                               file=sys.stderr if show else _Null()) as bar:
            for start in range(0, len(inputs), CHUNK):
                chunk = inputs[start:start + CHUNK]
                try:
                    tasks = await queue.submit_many([(task_type, x, options) for x in chunk],
                                                    concurrency=concurrency, bulk=bulk)
                except BulkSubmitError as exc:
                    _print(exc.tasks, as_json)
                    written = start + sum(1 for t in exc.tasks if t is not None)
                    first = exc.errors[0][0] + start
                    raise QoError(f"stopped: {written} of {len(inputs)} tasks were "
                                       f"submitted (their ids are printed); input {first + 1} failed: "
                                       f"{exc.errors[0][1]}") from None
                _print(tasks, as_json)
                bar.update(len(chunk))
    if not quiet:
        click.echo(f"submitted {len(inputs)} {task_type} task{'s' if len(inputs) != 1 else ''} "
                   f"to queue {queue.name!r}", err=True)


def _print(tasks: list[Any], as_json: bool) -> None:
    for t in tasks:
        if t is None:
            continue
        if as_json:
            echo_json(t.public_dict())
        else:
            click.echo(t.id)


class _Null:
    """A progress bar's file when none is shown."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
