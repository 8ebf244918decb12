"""A ``memory://`` backend written as a third party would: qo's public API only.

``memory://NAME`` names a store in this process; every Storage opened on the same URL
sees the same data. Register this module as a plugin::

    qo.plugins.get_plugins().register(memory_backend, name="memory-test")
"""

from __future__ import annotations

import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

import qo
from qo.storage import Blob, Entry, NotFound, PreconditionFailed, validate_key

_stores: dict[str, "_Store"] = {}
_stores_lock = threading.Lock()


class _Store:
    """One named store: key -> (data, etag), behind a lock (racers may be threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, tuple[bytes, str]] = {}


def forget(name: str) -> None:
    """Drop the store ``memory://name`` (test teardown)."""
    with _stores_lock:
        _stores.pop(name, None)


class MemoryStorage:
    """Storage in a dict; etags are random per write, not content hashes."""

    name = "memory"

    def __init__(self, url: str):
        self.store_name = urlsplit(url).netloc
        with _stores_lock:
            self._store = _stores.setdefault(self.store_name, _Store())

    async def get(self, key: str) -> Blob:
        validate_key(key)
        with self._store.lock:
            found = self._store.objects.get(key)
        if found is None:
            raise NotFound("no such key", backend=self.name, key=key)
        return Blob(*found)

    async def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise qo.InvalidInput("data", "must be bytes")
        etag = f'"{uuid.uuid4().hex}"'
        with self._store.lock:
            current = self._store.objects.get(key)
            if if_none_match and current is not None:
                raise PreconditionFailed("key exists", backend=self.name, key=key)
            if if_match is not None and (current is None or current[1] != if_match):
                raise PreconditionFailed("etag changed or key missing", backend=self.name, key=key)
            self._store.objects[key] = (bytes(data), etag)
        return etag

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        validate_key(key)
        with self._store.lock:
            current = self._store.objects.get(key)
            if current is None:
                return
            if if_match is not None and current[1] != if_match:
                raise PreconditionFailed("etag changed", backend=self.name, key=key)
            del self._store.objects[key]

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        with self._store.lock:
            items = sorted(self._store.objects.items())  # code point order == UTF-8 byte order
        return [
            Entry(key, etag, len(data))
            for key, (data, etag) in items
            if key.startswith(prefix) and (start_after is None or key > start_after)
        ][: max(limit, 0)]

    async def close(self) -> None:
        return None


@qo.hookimpl
def qo_storage_schemes() -> list[str]:
    return ["memory"]


@qo.hookimpl
def qo_storage(url: str, options: dict[str, Any]) -> MemoryStorage | None:
    if not url.lower().startswith("memory://"):
        return None
    return MemoryStorage(url)
