"""``qo doctor``: prove a store's conditional-write semantics before trusting it.

First, a backend that learns how its store speaks (``learn_dialect``, the S3 backend)
does so: its finding is printed (``capability: dialect``), and a store it refuses
fails the ``safe store`` check with the backend's one line.

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

from .errors import ConfigurationError, PreconditionFailed, StorageError
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
        detail = next(c.detail for c in checks if c.name == "conditional delete")
        add("conditional delete", "yes (proven above)" if proved["conditional delete"]
            else f"no: {detail}")
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
    if getattr(storage, "clock_observed", None) is False:  # the backend says no response dated it yet
        add("server clock", "not proven: no response of the server carried its time (Date header); "
            "the local clock is used until one does", ok=False)
    elif isinstance(offset, (int, float)):
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


#: what a declared dialect's ``delete`` setting means (qo_s3.dialect)
_DELETE_DIALECT = {
    "refused": "the store refuses DELETE with If-Match (e.g. 501 NotImplemented)",
    "ignored": "the store ignores If-Match on DELETE (a stale etag deletes)",
}


async def learn_dialect(storage: Storage, checks: list[Check]) -> None:
    """Have a backend that learns its store's dialect (``learn_dialect``) do so, and add
    what it found: a ``safe store`` check failing with the backend's one line when it
    refuses the store (then learned anyway, ``force=True``, so the checks can show
    why), and a ``capability: dialect`` line."""
    learn = getattr(storage, "learn_dialect", None)
    if not callable(learn):
        return
    try:
        try:
            dialect = await learn()
        except ConfigurationError as exc:  # the backend refuses the store (UnsafeStore)
            checks.append(Check("safe store", False, str(exc)))
            dialect = await learn(force=True)
    except StorageError as exc:
        checks.append(Check(CAPABILITY + "dialect", False, f"not learned: {type(exc).__name__}: {exc}",
                            required=False))
        return
    spelled = getattr(dialect, "spelled", None)
    text = spelled() if callable(spelled) else repr(dialect)
    source = getattr(dialect, "source", "")
    checks.append(Check(CAPABILITY + "dialect", True, f"{text}{f' ({source})' if source else ''}", required=False))


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
        except StorageError as exc:
            return False, f"the store refuses a delete with If-Match ({exc}); qo does not need it to be safe"
        try:
            await storage.get(key)
            gone = False
        except NotFound:
            gone = True
        declared = getattr(storage, "conditional_delete", None)
        if declared is False:
            how = _DELETE_DIALECT.get(getattr(getattr(storage, "dialect", None), "delete", None),
                                      "the store does not honour it")
            return False, (f"{how}; the backend declares conditional_delete = False and deletes "
                           "plainly (qo does not need it to be safe)")
        if gone:
            return False, "delete ignores If-Match (qo does not need it to be safe)"
        return False, "delete with a stale etag neither failed nor deleted"

    try:
        await learn_dialect(storage, checks)
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
