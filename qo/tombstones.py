"""Deleting what another writer may change, without trusting a conditional DELETE.

A delete must lose to any change made after its writer read the object. Not every S3
server honours ``If-Match`` on DELETE (Ceph RGW 16 ignores it, LocalStack 4 refuses it),
so no delete rests on it: the deleter first replaces the version it judged with a
tombstone by CAS, which fails if anybody changed the object since, and only then
deletes, unconditionally. The CAS is where the delete and any concurrent change meet.

- Tasks and packs carry their tombstone as a field (``purging_at``): every reader that
  would change them takes such a task as gone (``TaskNotFound``), and their ids are
  never written again, so the delete after it can hurt nobody.
- Records whose keys are written again (idempotency records, worker records) are
  replaced by a tombstone object (``tombstone``). Its maker deletes it at once (one
  request later). Anybody else may replace a tombstone by CAS, to take the key over or
  to renew the tombstone and delete it, only once it is older than ``GRACE`` (its maker
  died between the two requests); a writer that meets a younger one waits for it to go.
  So a record written over a tombstone is never deleted by that tombstone's maker,
  unless the maker stood still for ``GRACE`` between two requests.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import NotFound, PreconditionFailed, StorageUnavailable
from .model import dumps, new_rev

#: a tombstone younger than this (seconds, on the queue's clock) belongs to its maker
GRACE = 30.0
_MARK = b'{"qo_tombstone":'


def tombstone(now: float, why: str) -> bytes:
    """The bytes of a tombstone made at ``now`` (a nonce makes every one's etag its own)."""
    return dumps({"qo_tombstone": {"at": now, "why": why, "nonce": new_rev()}})


def made_at(data: bytes) -> float | None:
    """When the tombstone in ``data`` was made; None if ``data`` is not a tombstone. A
    tombstone whose time cannot be read counts as old (anybody may clear it)."""
    if not data.startswith(_MARK):
        return None
    try:
        at = json.loads(data)["qo_tombstone"]["at"]
    except (ValueError, KeyError, TypeError):
        return 0.0
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0


def is_tombstone(data: bytes) -> bool:
    return data.startswith(_MARK)


def is_young(data: bytes, now: float) -> bool:
    """A tombstone its maker is about to delete: leave it be (wait for it to go)."""
    at = made_at(data)
    return at is not None and now - at < GRACE


async def delete_unchanged(store: Any, key: str, etag: str, now: float, why: str) -> bool:
    """Delete ``key`` if it is still at version ``etag``: tombstone it by CAS over that
    version, then delete. False (nothing deleted) if it changed or went in between."""
    if not await _cas(store, key, tombstone(now, why), etag):
        return False
    await store.backoff.call(lambda: store.storage.delete(key))
    return True


async def _cas(store: Any, key: str, data: bytes, etag: str) -> bool:
    """CAS ``data`` over ``etag``; a refusal after a failure whose outcome was unknown is
    checked against what is stored (our own tombstone, its response lost, is ours)."""
    uncertain = False
    for attempt in range(1, store.backoff.attempts + 1):
        try:
            await store.storage.put(key, data, if_match=etag)
            return True
        except StorageUnavailable as exc:
            uncertain = True
            if attempt == store.backoff.attempts:
                raise
            await store.backoff.pause(attempt, exc)
        except (PreconditionFailed, NotFound):
            if not uncertain:
                return False
            try:
                blob = await store.backoff.call(lambda: store.storage.get(key))
            except NotFound:
                return False
            return blob.data == data
    raise AssertionError("unreachable")


async def clear_old(store: Any, key: str, data: bytes, etag: str, now: float) -> bool:
    """Delete the tombstone ``data`` (at ``etag``) left by a maker that died before its
    delete: renewed by CAS first, so a writer that took the key over in between keeps
    its record. False if it is young (its maker deletes it) or changed."""
    if not is_tombstone(data) or is_young(data, now):
        return False
    return await delete_unchanged(store, key, etag, now, "cleared")
