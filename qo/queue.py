"""The Queue: a named queue inside a storage URL."""

from __future__ import annotations

import re
from typing import Any

from .backends import default_url, open_storage
from .errors import InvalidInput
from .plugins import Plugins, get_plugins
from .storage import Storage

QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_queue_name(name: str) -> str:
    if not isinstance(name, str) or not QUEUE_NAME.match(name) or ".." in name:
        raise InvalidInput(
            "queue", f"{name!r} is not a queue name (1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric)"
        )
    return name


class Queue:
    """A queue named ``name`` in ``storage``; its objects live under ``{name}/``."""

    def __init__(self, storage: Storage, name: str = "default", *, plugins: Plugins | None = None, url: str = ""):
        self.storage = storage
        self.name = validate_queue_name(name)
        self.plugins = plugins or get_plugins()
        self.url = url

    async def close(self) -> None:
        await self.storage.close()

    async def __aenter__(self) -> "Queue":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def connect(
    url: str | None = None,
    *,
    queue: str | None = None,
    options: dict[str, Any] | None = None,
    plugins: Plugins | None = None,
) -> Queue:
    """Open ``queue`` (default ``QO_QUEUE``, else ``default``) at ``url`` (default ``QO_URL``, else ``./.qo``)."""
    import os

    url = default_url() if url is None else url
    name = validate_queue_name(queue or os.environ.get("QO_QUEUE") or "default")
    plugins = plugins or get_plugins()
    storage = open_storage(url, options, plugins)
    return Queue(storage, name, plugins=plugins, url=url)
