"""``qo doctor``: prove a store's conditional-write semantics before trusting it.

After the checks, a capabilities section (checks named ``capability: ...``, never
required) says what the backend offers beyond the contract's minimum, read from the
Storage object itself (the engine names no backend): batch deletes (``delete_many``),
a server clock estimate (``clock_offset``), the keys per LIST request (``page_size``),
and a summary of which conditional operations the checks above proved.
"""

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


CAPABILITY = "capability: "  #: name prefix of the informational capability lines


def capabilities(storage: Storage, checks: list[Check]) -> list[Check]:
    """What ``storage`` offers, from its attributes and from ``checks`` (already run).

    Informational: never required, ``ok`` unless a proof above failed.
    """
    proved = {c.name: c.ok for c in checks}
    out: list[Check] = []

    def add(name: str, detail: str, ok: bool = True) -> None:
        out.append(Check(CAPABILITY + name, ok, detail, required=False))

    writes = [n for n in ("create-only", "compare-and-swap") if proved.get(n)]
    add("conditional writes", (" and ".join(writes) + " (proven above)") if writes else "none proven",
        ok=len(writes) == 2)
    if "conditional delete" in proved:
        add("conditional delete", "yes (proven above)" if proved["conditional delete"]
            else "no: a delete ignores If-Match (qo does not rely on it)")
    if callable(getattr(storage, "delete_many", None)):
        add("batch delete", "yes: delete_many removes many keys in one request (markers are cleared in batches)")
    else:
        add("batch delete", "no: one request per deleted key")
    page = getattr(storage, "page_size", None)
    if isinstance(page, int) and page > 0:
        add("listing page size", f"{page} keys per LIST request")
    else:
        add("listing page size", "not stated by the backend (one request per list call)")
    offset = getattr(storage, "clock_offset", None)
    if isinstance(offset, (int, float)):
        add("server clock", f"yes: offset {offset:+.1f}s, estimated from the server's responses (clock_offset); "
            "leases and due times follow the server")
    else:
        add("server clock", "no: the local clock is used as is")
    return out


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
    checks += capabilities(storage, checks)
    try:
        await delete_many(storage, written)
    except StorageError as exc:
        checks.append(Check("cleanup", False, f"could not delete scratch keys: {exc}", required=False))
    return checks
