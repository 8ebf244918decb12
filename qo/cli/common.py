"""What every command shares: --url/--queue, running a coroutine, one-line errors."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from typing import Any, Awaitable, Callable

import click

from ..errors import QoError


def queue_options(fn: Callable) -> Callable:
    """Add ``--url`` and ``--queue``; when absent: QO_URL / QO_QUEUE, then qo.toml or
    ``[tool.qo]``, then ``./.qo`` and ``default`` (see ``qo config``)."""
    fn = click.option("--queue", "queue_name", default=None,
                      help="Queue name (default: QO_QUEUE, qo.toml, else 'default').")(fn)
    fn = click.option("--url", default=None,
                      help="Storage URL: s3://bucket/prefix, file:///path or a path, sqlite:///path/queue.db "
                           "(default: QO_URL, qo.toml, else ./.qo).")(fn)
    return fn


def run(coro_fn: Callable[..., Awaitable[Any]]) -> Callable:
    """Run an async command body; a QoError becomes one line on stderr and exit 1."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except QoError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


#: a command a person waits on gives up on unreachable storage within about a second
#: (5 tries); daemons (worker, scheduler) pass ``patient=True`` and keep the engine's
INTERACTIVE_ATTEMPTS = 5


async def open_queue(url: str, queue_name: str, *, patient: bool = False):
    from ..queue import connect
    from ..store import Backoff

    queue = await connect(url, queue=queue_name)
    if not patient:
        queue.store.backoff = Backoff(attempts=INTERACTIVE_ATTEMPTS, cap=0.5)
    return queue


async def say_if_no_objects(queue: Any) -> bool:
    """After a read found nothing: if the queue holds no object at all (one LIST), say so
    on stderr, naming where qo looked (a wrong --url or --queue is the usual cause)."""
    from ..backends import redact_url

    if await queue.store.backoff.call(lambda: queue.storage.list(f"{queue.name}/", limit=1)):
        return False
    click.echo(f"queue {queue.name!r} at {redact_url(queue.url)} has no objects: nothing was ever submitted "
               "there (check --url and --queue; `qo config` shows the defaults)", err=True)
    return True


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True, default=str))


def say_skipped(queue: Any, before: int) -> None:
    """After a listing: how many unreadable objects it skipped (each named above, once)."""
    skipped = queue.store.bad.count - before
    if skipped:
        click.echo(f"{skipped} unreadable object{'s' if skipped != 1 else ''} skipped (named above; "
                   "`qo doctor --scan` lists every one)", err=True)
