"""The storage contract: five atomic primitives every backend implements.

Everything else (tasks, leases, schedules, limits) is built on these in the engine.
The only synchronisation primitives of the whole system are ``put(if_none_match=True)``
(create-only) and ``put(if_match=etag)`` (compare-and-swap).
"""

from __future__ import annotations

import asyncio
from typing import Iterable, Protocol, runtime_checkable

import attrs

from .errors import (
    InvalidInput,
    NotFound,
    PreconditionFailed,
    StorageBusy,
    StorageError,
    StorageUnavailable,
    Throttled,
)

__all__ = [
    "Blob",
    "Entry",
    "Storage",
    "NotFound",
    "PreconditionFailed",
    "StorageError",
    "StorageBusy",
    "StorageUnavailable",
    "Throttled",
    "validate_key",
    "check_put",
    "delete_many",
    "MAX_KEY_BYTES",
    "REQUIRED_METHODS",
]

MAX_KEY_BYTES = 1024
#: the async methods every backend has; checked when a backend's storage is opened
#: (``qo.backends.open_storage``), with ``name`` (a str, defaulting to the URL scheme)
REQUIRED_METHODS = ("get", "put", "delete", "list", "close")


@attrs.frozen
class Blob:
    """An object's bytes and the etag they were read at."""

    data: bytes
    etag: str


@attrs.frozen
class Entry:
    """One listed key. ``modified`` is epoch seconds on the storage's clock, if known."""

    key: str
    etag: str
    size: int
    modified: float | None = None


@runtime_checkable
class Storage(Protocol):
    """What a backend provides. Keys are ``/``-separated relative paths.

    Guarantees a backend must give:

    - ``get`` returns a whole object and the etag of exactly those bytes; a reader never
      sees a partially written object.
    - ``put(if_none_match=True)`` creates the key only if it does not exist, atomically
      against every other writer in every process; otherwise ``PreconditionFailed``.
    - ``put(if_match=etag)`` replaces the object only if its current etag is ``etag``,
      atomically; otherwise (changed or missing) ``PreconditionFailed``.
    - ``delete(if_match=etag)`` deletes only that version; a missing key is not an error.
    - ``list`` returns keys starting with ``prefix`` (a plain string prefix, not a
      directory), in lexicographic order of their UTF-8 bytes, after ``start_after``,
      at most ``limit``.
    - Transient failures raise ``StorageUnavailable``; the engine, not the backend,
      retries them. A throttle (the store says to slow down: S3 ``SlowDown``, any 429
      or 503) raises its subclass ``Throttled``, which the engine retries from a longer
      wait; the backend's SDK retries nothing itself. A backend that waits on its own
      for a lock held elsewhere (SQLite's ``busy_timeout``) raises ``StorageBusy`` once
      that wait is over: the engine does not retry it within the operation, so the
      timeout bounds the whole wait.
    """

    name: str

    async def get(self, key: str) -> Blob: ...

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str: ...

    async def delete(self, key: str, *, if_match: str | None = None) -> None: ...

    async def list(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> list[Entry]: ...

    async def close(self) -> None: ...


def validate_key(key: str, *, field: str = "key") -> str:
    """Reject keys that could escape a root or confuse a backend; return the key."""
    if not isinstance(key, str) or not key:
        raise InvalidInput(field, "must be a non-empty string")
    if "\x00" in key:
        raise InvalidInput(field, "must not contain NUL")
    if "\\" in key:
        raise InvalidInput(field, "must not contain a backslash")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise InvalidInput(field, f"longer than {MAX_KEY_BYTES} bytes") from None
        raise InvalidInput(field, "must be valid unicode (no lone surrogates)") from None
    if size > MAX_KEY_BYTES:
        raise InvalidInput(field, f"longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidInput(field, "must be relative (no leading '/')")
    # an empty, "." or ".." segment needs "//", a trailing "/", or a segment starting "."
    if "//" in key or key.endswith("/") or key.startswith(".") or "/." in key:
        for part in key.split("/"):
            if part in ("", ".", ".."):
                raise InvalidInput(field, f"has an empty, '.' or '..' path segment: {key!r}")
    return key


def validate_prefix(prefix: str, *, field: str = "prefix") -> str:
    """A list prefix: empty, or a key's beginning (it may end in '/' or mid-segment)."""
    if not isinstance(prefix, str):
        raise InvalidInput(field, "must be a string")
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") + "/x" if prefix.endswith("/") else prefix, field=field)
    return prefix


def check_put(data: object, if_match: str | None, if_none_match: bool) -> bytes:
    """The checks of ``put``'s arguments every backend makes before any I/O; returns the
    data as ``bytes``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput("data", "must be bytes")
    if if_match is not None and if_none_match:
        raise InvalidInput("if_match", "cannot be combined with if_none_match")
    return bytes(data)


async def delete_many(storage: Storage, keys: Iterable[str]) -> None:
    """Delete keys in as few requests as the backend allows (missing keys are fine)."""
    keys = list(keys)
    if not keys:
        return
    bulk = getattr(storage, "delete_many", None)
    if bulk is not None:
        for i in range(0, len(keys), 1000):
            await bulk(keys[i : i + 1000])
        return
    await asyncio.gather(*(storage.delete(k) for k in keys))
