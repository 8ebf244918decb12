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
    """Add ``--url`` (QO_URL, else ./.qo) and ``--queue`` (QO_QUEUE, else default)."""
    fn = click.option("--queue", "queue_name", envvar="QO_QUEUE", default="default", show_default=True,
                      help="Queue name (QO_QUEUE).")(fn)
    fn = click.option("--url", envvar="QO_URL", default="./.qo", show_default=True,
                      help="Storage URL: s3://bucket/prefix, file:///path or a path (QO_URL).")(fn)
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


async def open_queue(url: str, queue_name: str):
    from ..queue import connect

    return await connect(url, queue=queue_name)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True, default=str))
