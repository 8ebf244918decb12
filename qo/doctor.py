"""``qo doctor``: prove a store's conditional-write semantics before trusting it.

After the checks, a capabilities section (checks named ``capability: ...``, never
required) says what the backend offers beyond the contract's minimum, read from the
Storage object itself (the engine names no backend): a server clock estimate
(``clock_offset``), the keys per LIST request (``page_size``), a summary of which
conditional operations the checks above proved, and batch deletes (``delete_many``),
which are proven by doing one: a backend may have the method and a service that
refuses it (Azurite 3.35.0 refuses every delete inside a blob batch).

Every scratch object lives under one prefix and is deleted at the end, whatever
failed: the keys written (or attempted) one by one, then whatever a LIST of the
prefix still shows.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import attrs

from .errors import PreconditionFailed, StorageError
from .storage import NotFound, Storage


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


CAPABILITY = "capability: "  #: name prefix of the informational capability lines


def capabilities(storage: Storage, checks: list[Check], batch: tuple[bool, str] | None = None) -> list[Check]:
    """What ``storage`` offers, from its attributes and from ``checks`` (already run);
    ``batch`` is the outcome of :func:`prove_batch_delete` (``None``: not tried).

    Informational: never required, ``ok`` unless a proof failed.
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
    if not callable(getattr(storage, "delete_many", None)):
        add("batch delete", "no: the backend has no delete_many; one request per deleted key")
    elif batch is None:
        add("batch delete", "not proven: the checks above failed before it was tried", ok=False)
    else:
        add("batch delete", batch[1], ok=batch[0])
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


async def prove_batch_delete(storage: Storage, root: str, written: list[str], count: int = 3) -> tuple[bool, str]:
    """Write ``count`` scratch objects under ``root``, delete them with one
    ``delete_many`` call, then LIST and GET to see that they are gone.

    Returns ``(proven, detail)``. Having the method proves nothing: a service may
    accept the call and delete nothing, or refuse it. The keys go to ``written``
    before they are written, so the caller's cleanup deletes them whatever happens.
    """
    keys = [f"{root}/batch/{i}" for i in range(count)]
    written.extend(keys)
    try:
        await asyncio.gather(*(storage.put(k, b"") for k in keys))
    except StorageError as exc:
        return False, f"not proven: could not write its scratch objects ({type(exc).__name__}: {exc})"
    requests = getattr(storage, "http_requests", None)
    try:
        await storage.delete_many(keys)  # type: ignore[attr-defined]
    except Exception as exc:  # a backend's or a wrapper's failure, whatever its class, is the answer
        return False, f"no: delete_many failed ({type(exc).__name__}: {exc}); {_SINGLY}"
    after = getattr(storage, "http_requests", None)
    try:
        listed = {e.key for e in await storage.list(f"{root}/batch/")}
        left = [k for k in keys if k in listed or await _exists(storage, k)]
    except StorageError as exc:
        return False, f"not proven: could not check the deleted objects ({type(exc).__name__}: {exc}); {_SINGLY}"
    if left:
        return False, (f"no: delete_many returned, but {len(left)} of {count} objects are still there; "
                       f"{_SINGLY}")
    detail = f"yes (proven: {count} objects deleted in one call"
    if isinstance(requests, int) and isinstance(after, int) and after - requests > 1:
        detail += f", which took {after - requests} requests: the backend deleted them one by one"
    return True, detail + ")"


#: what doctor does when a batch delete is not proven
_SINGLY = "doctor deleted its scratch objects one by one"


async def _exists(storage: Storage, key: str) -> bool:
    try:
        await storage.get(key)
    except NotFound:
        return False
    return True


async def cleanup(storage: Storage, root: str, written: list[str], *, batch_ok: bool) -> str | None:
    """Delete every scratch object: ``written`` (with ``delete_many`` only if it was
    proven, else one by one), then anything a LIST of ``root`` still shows, one by
    one. ``None`` when nothing is left, else what went wrong."""
    keys = sorted(set(written))
    problem: str | None = None
    try:
        if batch_ok and keys:
            await storage.delete_many(keys)  # type: ignore[attr-defined]
        else:
            await asyncio.gather(*(storage.delete(k) for k in keys))
    except Exception as exc:  # go on to the LIST: it finds what is left
        problem = f"{type(exc).__name__}: {exc}"
    try:
        left = [e.key for e in await storage.list(f"{root}/")]
        if left:
            await asyncio.gather(*(storage.delete(k) for k in left))
            left = [e.key for e in await storage.list(f"{root}/")]
    except StorageError as exc:
        return f"could not delete or list the scratch objects under {root}/ ({type(exc).__name__}: {exc})"
    if left:
        return f"{len(left)} scratch objects are left under {root}/ ({problem or 'deleted, yet listed'})"
    return None


async def run_checks(storage: Storage, *, base: str = "_doctor") -> list[Check]:
    """Exercise read/write, create-only, CAS, list, conditional delete and batch delete
    under a scratch prefix, and delete every scratch object again, whatever failed."""
    root = f"{base}/{uuid.uuid4().hex}"
    checks: list[Check] = []
    written: list[str] = []  # every key written or attempted (a lost response may have landed)
    batch: tuple[bool, str] | None = None

    async def step(name: str, fn: Any, required: bool = True) -> bool:
        try:
            ok, detail = await fn()
        except StorageError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        checks.append(Check(name, ok, detail, required))
        return ok

    async def read_write():
        key = f"{root}/plain"
        written.append(key)
        etag = await storage.put(key, b"hello")
        blob = await storage.get(key)
        if blob.data != b"hello" or blob.etag != etag:
            return False, "read back different bytes or etag than written"
        return True, "write, read back and etag agree"

    async def create_only():
        key = f"{root}/create"
        written.append(key)
        await storage.put(key, b"first", if_none_match=True)
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
        written.append(key)
        etag = await storage.put(key, b"v1")
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
            written.append(k)
            await storage.put(k, b"")
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

    try:
        if await step("read/write", read_write):
            await step("create-only", create_only)
            await step("compare-and-swap", cas)
            await step("list", listing)
            await step("conditional delete", conditional_delete, required=False)
            if callable(getattr(storage, "delete_many", None)):
                batch = await prove_batch_delete(storage, root, written)
        checks += capabilities(storage, checks, batch)
    finally:  # never leave scratch objects behind, whatever failed or was interrupted
        problem = await cleanup(storage, root, written, batch_ok=batch is not None and batch[0])
        if problem is not None:
            checks.append(Check("cleanup", False, problem, required=False))
    return checks
