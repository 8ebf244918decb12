"""``qo doctor``: prove a store's conditional-write semantics before trusting it."""

from __future__ import annotations

import uuid

import attrs

from .errors import PreconditionFailed, StorageError
from .storage import NotFound, Storage, delete_many


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


async def run_checks(storage: Storage, *, base: str = "_doctor") -> list[Check]:
    """Exercise read/write, create-only, CAS, list and conditional delete under a scratch prefix."""
    root = f"{base}/{uuid.uuid4().hex}"
    checks: list[Check] = []
    written: list[str] = []

    async def step(name: str, fn, required: bool = True) -> bool:
        try:
            ok, detail = await fn()
        except StorageError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        checks.append(Check(name, ok, detail, required))
        return ok

    async def read_write():
        key = f"{root}/plain"
        etag = await storage.put(key, b"hello")
        written.append(key)
        blob = await storage.get(key)
        if blob.data != b"hello" or blob.etag != etag:
            return False, "read back different bytes or etag than written"
        return True, "write, read back and etag agree"

    async def create_only():
        key = f"{root}/create"
        await storage.put(key, b"first", if_none_match=True)
        written.append(key)
        try:
            await storage.put(key, b"second", if_none_match=True)
        except PreconditionFailed:
            data = (await storage.get(key)).data
            if data != b"first":
                return False, "the losing create-only write changed the object"
            return True, "a second create-only write is refused (If-None-Match: *)"
        return False, (
            "NOT SUPPORTED: a second create-only write succeeded. This store ignores "
            "If-None-Match; qo cannot run safely on it"
        )

    async def cas():
        key = f"{root}/cas"
        etag = await storage.put(key, b"v1")
        written.append(key)
        new = await storage.put(key, b"v2", if_match=etag)
        try:
            await storage.put(key, b"v3", if_match=etag)
        except PreconditionFailed:
            if (await storage.get(key)).data != b"v2":
                return False, "a refused compare-and-swap changed the object"
            return True, f"compare-and-swap with a stale etag is refused (If-Match); new etag {new}"
        return False, (
            "NOT SUPPORTED: a write with a stale etag succeeded. This store ignores "
            "If-Match; qo cannot run safely on it"
        )

    async def listing():
        keys = [f"{root}/list/{c}" for c in ("b", "a", "c")]
        for k in keys:
            await storage.put(k, b"")
            written.append(k)
        got = [e.key for e in await storage.list(f"{root}/list/")]
        if got != sorted(keys):
            return False, f"list returned {got}, expected {sorted(keys)}"
        page = await storage.list(f"{root}/list/", start_after=sorted(keys)[0], limit=1)
        if [e.key for e in page] != [sorted(keys)[1]]:
            return False, "start_after/limit are not honoured"
        return True, "lexicographic order, start_after and limit honoured"

    async def conditional_delete():
        key = f"{root}/cas"
        try:
            await storage.delete(key, if_match='"0000"')
        except PreconditionFailed:
            return True, "delete with a stale etag is refused"
        try:
            await storage.get(key)
        except NotFound:
            return False, "delete ignores If-Match (qo does not need it to be safe)"
        return False, "delete with a stale etag neither failed nor deleted"

    if await step("read/write", read_write):
        await step("create-only", create_only)
        await step("compare-and-swap", cas)
        await step("list", listing)
        await step("conditional delete", conditional_delete, required=False)
    offset = getattr(storage, "clock_offset", None)
    if offset is not None:
        checks.append(Check("clock", True, f"server clock offset {offset:+.1f}s", required=False))
    try:
        await delete_many(storage, written)
    except StorageError as exc:
        checks.append(Check("cleanup", False, f"could not delete scratch keys: {exc}", required=False))
    return checks
