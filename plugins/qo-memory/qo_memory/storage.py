"""``memory://NAME``: the storage contract in a dict, for tests and demos in one process.

Stores are keyed by the URL's name (its netloc) in a process-wide dict, so every Storage
opened on the same URL in this process sees the same data; nothing is shared with other
processes. One lock per store makes create-only and CAS atomic against asyncio tasks
(no ``await`` inside the critical section) and against threads with their own loops.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from typing import Iterable
from urllib.parse import urlsplit

import qo
from qo.storage import Blob, Entry, NotFound, PreconditionFailed, check_put, validate_key, validate_prefix

_stores: dict[str, "_Store"] = {}
_stores_lock = threading.Lock()


class _Store:
    """One named store: key -> (data, etag, modified), plus its keys kept sorted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, tuple[bytes, str, float]] = {}
        self.keys: list[str] = []  # code point order == UTF-8 byte order (no surrogates)

    def remove(self, key: str) -> None:
        del self.objects[key]
        del self.keys[bisect.bisect_left(self.keys, key)]


def forget(name: str) -> None:
    """Drop the store ``memory://name`` and its data (test teardown)."""
    with _stores_lock:
        _stores.pop(name, None)


class MemoryStorage:
    """A :class:`qo.storage.Storage` in memory; etags are unique per write."""

    name = "memory"

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme.lower() != "memory" or not parts.netloc or parts.path not in ("", "/"):
            raise qo.ConfigurationError(f"{url!r}: expected memory://NAME (a name, no path)")
        self.store_name = parts.netloc
        with _stores_lock:
            self._store = _stores.setdefault(self.store_name, _Store())

    async def get(self, key: str) -> Blob:
        validate_key(key)
        with self._store.lock:
            found = self._store.objects.get(key)
        if found is None:
            raise NotFound("no such key", backend=self.name, key=key)
        return Blob(found[0], found[1])

    async def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        validate_key(key)
        data = check_put(data, if_match, if_none_match)
        etag = f'"{uuid.uuid4().hex}"'
        store = self._store
        with store.lock:
            current = store.objects.get(key)
            if if_none_match and current is not None:
                raise PreconditionFailed("key exists", backend=self.name, key=key)
            if if_match is not None and (current is None or current[1] != if_match):
                raise PreconditionFailed("etag changed or key missing", backend=self.name, key=key)
            if current is None:
                bisect.insort(store.keys, key)
            store.objects[key] = (data, etag, time.time())
        return etag

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        validate_key(key)
        with self._store.lock:
            current = self._store.objects.get(key)
            if current is None:
                return  # a missing key is not an error
            if if_match is not None and current[1] != if_match:
                raise PreconditionFailed("etag changed", backend=self.name, key=key)
            self._store.remove(key)

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key in one step; missing keys are fine."""
        keys = [validate_key(k) for k in keys]
        with self._store.lock:
            for key in keys:
                if key in self._store.objects:
                    self._store.remove(key)

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        validate_prefix(prefix)
        store = self._store
        with store.lock:
            begin = prefix if start_after is None or start_after < prefix else start_after
            i = bisect.bisect_right(store.keys, begin) if begin == start_after else bisect.bisect_left(store.keys, begin)
            out: list[Entry] = []
            while i < len(store.keys) and len(out) < limit and store.keys[i].startswith(prefix):
                key = store.keys[i]
                data, etag, modified = store.objects[key]
                out.append(Entry(key, etag, len(data), modified))
                i += 1
        return out

    async def close(self) -> None:
        return None  # the data stays for the next Storage opened on this URL
