"""The storage conformance kit: the contract of :mod:`qo.storage`, races included.

Shaped like fsspec's abstract tests: :class:`StorageFixtures` holds the fixtures (a
backend overrides ``storage_url``), one mixin per area holds the tests, and
:class:`ConformanceTests` combines them all, so a backend's whole test file is::

    import uuid
    import pytest
    from qo.testing import ConformanceTests, StorageFixtures

    class MyFixtures(StorageFixtures):
        @pytest.fixture
        def storage_url(self) -> str:
            return f"mine://{uuid.uuid4().hex}"  # fresh and empty for every test

    class TestMine(MyFixtures, ConformanceTests):
        pass

The URL must be resolvable by :func:`qo.backends.open_storage` in any process: the race
tests start racer processes that open it themselves. A backend whose state lives in one
process (an in-memory one) sets ``multiprocess = False``: its racers then run as threads
and the process variants are skipped with the reason. For readable assertion failures,
call ``pytest.register_assert_rewrite("qo.testing")`` in your conftest.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue as queue_module
import random
import sys
import threading
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, AsyncIterator, Callable, ClassVar, Iterable

import pytest
import pytest_asyncio

from qo.backends import open_storage
from qo.errors import InvalidInput
from qo.plugins import get_plugins
from qo.storage import (
    MAX_KEY_BYTES, Blob, NotFound, PreconditionFailed, Storage, StorageError, StorageUnavailable, delete_many,
)

__all__ = [
    "StorageFixtures",
    "GetTests",
    "CreateOnlyTests",
    "CasTests",
    "DeleteTests",
    "ListTests",
    "KeyTests",
    "LargeObjectTests",
    "RaceTests",
    "ConformanceTests",
]

RACERS = 8  # racers per race
CAS_INCREMENTS = 10  # counter increments per CAS racer
RACE_TIMEOUT = 60.0  # seconds before a stuck race fails instead of hanging
PAGINATED_KEYS = 1100  # more than one 1000-key page
WRITE_BATCH = 100  # concurrent puts when filling a root

INVALID_KEYS = [
    "",
    ".",
    "..",
    "/abs",
    "a//b",
    "a/./b",
    "a/../b",
    "a/",
    "a\x00b",
    "a\\b",
    "\ud800",
    "k" * 2000,
]

# Sorted by UTF-8 bytes; UTF-16 order would put the emoji before the ligature.
UNICODE_KEYS = [
    "tâches/z",
    "tâches/é",
    "tâches/日本語/ключ-é.json",
    "tâches/\ufb01",
    "tâches/🙂",
]

# Directory-vs-name ordering: '-' < '.' < '/' < '0' < 'b', so "a/b/c" sorts among
# "a/b-x", "a/b.c" and "a/b0" by its '/' (a filesystem walk must not put a directory
# "a/b" first or last), and "a/..." sorts between "a-c" and "a0".
TRICKY_KEYS = ["ab", "a0", "a/bc", "a/b0", "a/b/c", "a/b.c", "a/b-x", "a-c", "a.b"]


def _utf8_sorted(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8"))


async def _put_all(storage: Storage, items: dict[str, bytes]) -> dict[str, str]:
    """Write ``items`` concurrently in bounded batches; return key -> etag."""
    etags: dict[str, str] = {}
    pairs = list(items.items())
    for i in range(0, len(pairs), WRITE_BATCH):
        batch = pairs[i : i + WRITE_BATCH]
        results = await asyncio.gather(*(storage.put(k, v) for k, v in batch))
        etags.update((k, e) for (k, _), e in zip(batch, results))
    return etags


async def _list_all(storage: Storage, prefix: str, *, page: int = 1000) -> list[Any]:
    """Every entry under ``prefix``, paging with ``start_after`` until an empty page."""
    out: list[Any] = []
    start_after: str | None = None
    for _ in range(100_000):
        entries = await storage.list(prefix, start_after=start_after, limit=page)
        assert len(entries) <= page, f"list returned {len(entries)} entries for limit={page}"
        if not entries:
            return out
        out.extend(entries)
        start_after = entries[-1].key
    raise AssertionError("list paging did not end")


async def _keys(storage: Storage, prefix: str = "", **kwargs: Any) -> list[str]:
    return [e.key for e in await storage.list(prefix, **kwargs)]


# ---------------------------------------------------------------------------
# racers: module-level so they pickle into spawned / forkserver processes
# ---------------------------------------------------------------------------


def _payload(index: int) -> bytes:
    return f"racer-{index}".encode()


async def _create_only(storage: Storage, key: str, index: int) -> tuple[str, str | None]:
    """One create-only attempt: ("won", etag) or ("lost", None)."""
    try:
        etag = await storage.put(key, _payload(index), if_none_match=True)
    except PreconditionFailed:
        return ("lost", None)
    return ("won", etag)


async def _increment(storage: Storage, key: str, times: int, index: int = 0) -> dict[str, list[Any]]:
    """Increment the counter at ``key`` ``times`` times by CAS, writing ``b"VALUE racer-INDEX"``.

    A ``StorageUnavailable`` answer to a CAS (Ceph RGW answers some lost races with HTTP
    500) is an unknown outcome: re-read; our own bytes there mean it landed, the bytes
    we read before mean it did not (retry); anything else is left ``unknown``, resolved
    by the test from what the other writes read (:func:`_landed`). Returns ``won``
    (values), ``reads`` (the bytes each won or unknown write replaced) and ``unknown``
    (``(value, bytes written, bytes replaced)``).
    """
    won: list[int] = []
    reads: list[str] = []
    unknown: list[tuple[int, str, str]] = []
    while len(won) < times:
        for _attempt in range(10_000):
            blob = await _get_retrying(storage, key)
            value = int(blob.data.split()[0]) + 1
            mine = f"{value} racer-{index}".encode()
            try:
                await storage.put(key, mine, if_match=blob.etag)
            except PreconditionFailed:
                continue  # lost the race: re-read and try again
            except StorageUnavailable:
                now = await _get_retrying(storage, key)
                if now.data == mine:
                    break  # it landed
                if now.etag != blob.etag:
                    unknown.append((value, mine.decode(), blob.data.decode()))
                continue
            break
        else:
            raise AssertionError("a CAS racer never won in 10000 attempts")
        won.append(value)
        reads.append(blob.data.decode())
    return {"won": won, "reads": reads, "unknown": unknown}


async def _get_retrying(storage: Storage, key: str, tries: int = 50) -> Blob:
    """``get``, retried over transient failures (a loaded server may answer 503)."""
    for _ in range(tries - 1):
        try:
            return await storage.get(key)
        except StorageUnavailable:
            await asyncio.sleep(0.05)
    return await storage.get(key)


def _landed(results: list[dict[str, list[Any]]], final: str) -> list[int]:
    """The values of the unknown-outcome writes that landed: every landed write but the
    last was read by the write after it, so walk back from the final bytes and from
    the reads of the writes known to have won."""
    unknown = {written: (value, replaced) for r in results for value, written, replaced in r["unknown"]}
    seen: set[str] = set()
    todo = [final, *(read for r in results for read in r["reads"])]
    landed: list[int] = []
    while todo:
        data = todo.pop()
        if data in seen or data not in unknown:
            continue
        seen.add(data)
        value, replaced = unknown[data]
        landed.append(value)
        todo.append(replaced)
    return landed


async def _race(url: str, options: dict[str, Any], op: str, key: str, index: int, arg: Any, barrier: Any) -> Any:
    storage = open_storage(url, options)
    try:
        try:
            try:  # open connections before the start line, so all racers start together
                await storage.get(key + ".warm-up")
            except NotFound:
                pass
        except BaseException:
            barrier.abort()
            raise
        barrier.wait(RACE_TIMEOUT)
        if op == "create":
            return await _create_only(storage, key, index)
        if op == "cas":
            return await _increment(storage, key, arg, index)
        if op == "write":
            return await _overwrite(storage, key, arg)
        if op == "read":
            return await _read_until(storage, key, arg)
        raise ValueError(f"unknown race op {op!r}")
    finally:
        await storage.close()


def _racer(url: str, options: dict[str, Any], op: str, key: str, index: int, arg: Any, barrier: Any) -> Any:
    """One racer with its own event loop and its own storage opened from ``url``."""
    return asyncio.run(_race(url, options, op, key, index, arg, barrier))


def _process_racer(results: Any, env: dict[str, str], *args: Any) -> None:
    """Process entry point: run a racer, report (index, ok, result or traceback)."""
    os.environ.clear()
    os.environ.update(env)  # the test's environment now, not the forkserver's
    index = args[4]
    try:
        results.put((index, True, _racer(*args)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))


_preloaded = False


def _preload_modules(storage: Storage) -> list[str]:
    """This module and every module already imported from a storage plugin's package."""
    roots = {type(storage).__module__.partition(".")[0]}
    for plugin in get_plugins().pm.get_plugins():
        module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
        roots.add(module.partition(".")[0])
    roots = {r for r in roots if r != "qo" and not r.startswith("_")}  # qo comes with this module
    return [__name__, *sorted(m for m in list(sys.modules) if m.partition(".")[0] in roots)]


def _mp_context(storage: Storage) -> multiprocessing.context.BaseContext:
    """forkserver (backends preloaded: racers start fast) where there is one, else spawn."""
    global _preloaded
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if not _preloaded:  # only effective before the forkserver starts
        ctx.set_forkserver_preload(_preload_modules(storage))
        _preloaded = True
    return ctx


def _run_processes(
    storage: Storage, url: str, options: dict[str, Any], jobs: list[tuple[str, str, Any]]
) -> list[Any]:
    """Run ``(op, key, arg)`` jobs as processes released together by a Barrier."""
    ctx = _mp_context(storage)
    barrier = ctx.Barrier(len(jobs))
    results = ctx.Queue()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_process_racer, args=(results, env, url, options, op, key, i, arg, barrier), daemon=True)
        for i, (op, key, arg) in enumerate(jobs)
    ]
    for p in procs:
        p.start()
    try:
        out: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + RACE_TIMEOUT
        while len(out) + len(errors) < len(procs):
            try:
                index, ok, value = results.get(timeout=0.2)
            except queue_module.Empty:
                codes = [p.exitcode for p in procs]
                if any(code not in (None, 0) for code in codes) or time.monotonic() > deadline:
                    raise AssertionError(f"racer processes did not all report (exit codes {codes})") from None
                continue
            if ok:
                out[index] = value
            else:
                errors.append(f"racer {index}:\n{value}")
        if errors:
            raise AssertionError("racer processes failed:\n" + "\n".join(errors))
        return [out[i] for i in range(len(jobs))]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join()


def _run_threads(url: str, options: dict[str, Any], jobs: list[tuple[str, str, Any]]) -> list[Any]:
    """Run ``(op, key, arg)`` jobs as threads, each with its own event loop and storage."""
    barrier = threading.Barrier(len(jobs))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [
            pool.submit(_racer, url, options, op, key, i, arg, barrier) for i, (op, key, arg) in enumerate(jobs)
        ]
        done, pending = wait(futures, timeout=RACE_TIMEOUT)
        if pending:
            barrier.abort()
            raise AssertionError(f"{len(pending)} racer threads did not finish in {RACE_TIMEOUT}s")
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # the cause, not the BrokenBarrierError it gave the others
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return [f.result() for f in futures]


# partial reads: one writer overwrites, readers read; the writer stores a "done" marker


def _big_payload(index: int, size: int) -> bytes:
    """Distinct payloads whose every byte tells which one it is."""
    return bytes([65 + index]) * size


async def _overwrite(storage: Storage, key: str, arg: tuple[int, int, int]) -> list[tuple[str, int]]:
    count, size, writes = arg
    written = []
    for n in range(writes):
        index = n % count
        written.append((await storage.put(key, _big_payload(index, size)), index))
    await storage.put(key + ".done", b"1")
    return written


async def _read_until(storage: Storage, key: str, arg: tuple[int, int, int]) -> list[tuple[str, int]]:
    count, size, _ = arg
    known = {_big_payload(i, size): i for i in range(count)}
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + RACE_TIMEOUT
    while time.monotonic() < deadline:
        blob = await storage.get(key)
        seen.append((blob.etag, known.get(blob.data, -1)))  # -1: not a whole payload
        if len(seen) >= 3:
            try:
                await storage.get(key + ".done")
                return seen
            except NotFound:
                pass
    raise AssertionError(f"the writer did not finish in {RACE_TIMEOUT}s")


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


class StorageFixtures:
    """Fixtures the conformance tests use; a backend overrides ``storage_url``."""

    pytestmark: ClassVar[list[Any]] = [pytest.mark.asyncio]  # every test is async, in strict mode too

    #: False when the backend's state lives in one process (in-memory): racers run as
    #: threads and the process variants are skipped.
    multiprocess: ClassVar[bool] = True

    @pytest.fixture
    def storage_url(self) -> str:
        """A fresh, empty root URL for each test, resolvable by ``open_storage`` anywhere."""
        pytest.fail(f"{type(self).__name__} must override the storage_url fixture", pytrace=False)

    @pytest.fixture
    def storage_options(self) -> dict[str, Any]:
        """Extra options passed to ``open_storage`` (in racer processes too: keep them picklable)."""
        return {}

    @pytest_asyncio.fixture
    async def storage(self, storage_url: str, storage_options: dict[str, Any]) -> AsyncIterator[Storage]:
        """The storage at ``storage_url``, closed after the test."""
        storage = open_storage(storage_url, storage_options)
        try:
            yield storage
        finally:
            await storage.close()


# ---------------------------------------------------------------------------
# the contract, one area per mixin
# ---------------------------------------------------------------------------


class GetTests:
    """``get`` returns the whole object and the etag of exactly those bytes."""

    async def test_get_of_a_missing_key_raises_not_found(self, storage: Storage) -> None:
        with pytest.raises(NotFound):
            await storage.get("missing.json")

    async def test_get_of_a_key_that_is_only_a_prefix_raises_not_found(self, storage: Storage) -> None:
        await storage.put("dir/child", b"x")
        for key in ("dir", "dir/chi"):
            with pytest.raises(NotFound):
                await storage.get(key)

    async def test_put_get_and_list_agree_on_bytes_and_etag(self, storage: Storage) -> None:
        data = bytes(range(256)) * 4
        etag = await storage.put("obj.bin", data)
        assert isinstance(etag, str) and etag
        assert await storage.get("obj.bin") == Blob(data, etag)
        [entry] = await storage.list("")
        assert (entry.key, entry.etag, entry.size) == ("obj.bin", etag, len(data))

    async def test_an_empty_object_round_trips(self, storage: Storage) -> None:
        etag = await storage.put("empty", b"")
        assert await storage.get("empty") == Blob(b"", etag)
        [entry] = await storage.list("")
        assert (entry.etag, entry.size) == (etag, 0)


class CreateOnlyTests:
    """``put(if_none_match=True)`` creates a key only if it does not exist."""

    async def test_create_only_put_creates_a_missing_key(self, storage: Storage) -> None:
        etag = await storage.put("k", b"first", if_none_match=True)
        assert await storage.get("k") == Blob(b"first", etag)

    async def test_create_only_put_on_an_existing_key_fails_and_leaves_it_unchanged(self, storage: Storage) -> None:
        etag = await storage.put("k", b"first")
        with pytest.raises(PreconditionFailed):
            await storage.put("k", b"second", if_none_match=True)
        assert await storage.get("k") == Blob(b"first", etag)

    async def test_create_only_put_succeeds_again_after_delete(self, storage: Storage) -> None:
        await storage.put("k", b"first", if_none_match=True)
        await storage.delete("k")
        etag = await storage.put("k", b"again", if_none_match=True)
        assert await storage.get("k") == Blob(b"again", etag)


class CasTests:
    """``put(if_match=etag)`` replaces an object only at that etag; plain ``put`` always does."""

    async def test_cas_with_the_current_etag_replaces_and_returns_a_new_etag(self, storage: Storage) -> None:
        old = await storage.put("k", b"v1")
        new = await storage.put("k", b"v2", if_match=old)
        assert new != old
        assert await storage.get("k") == Blob(b"v2", new)

    async def test_cas_with_a_stale_etag_fails_and_leaves_the_object_unchanged(self, storage: Storage) -> None:
        stale = await storage.put("k", b"v1")
        current = await storage.put("k", b"v2")
        with pytest.raises(PreconditionFailed):
            await storage.put("k", b"v3", if_match=stale)
        assert await storage.get("k") == Blob(b"v2", current)

    async def test_cas_on_a_missing_key_fails_and_creates_nothing(self, storage: Storage) -> None:
        etag = await storage.put("other", b"x")
        with pytest.raises(PreconditionFailed):
            await storage.put("k", b"v", if_match=etag)
        with pytest.raises(NotFound):
            await storage.get("k")

    async def test_cas_on_a_deleted_key_fails(self, storage: Storage) -> None:
        etag = await storage.put("k", b"v1")
        await storage.delete("k")
        with pytest.raises(PreconditionFailed):
            await storage.put("k", b"v2", if_match=etag)
        with pytest.raises(NotFound):
            await storage.get("k")

    async def test_each_etag_wins_at_most_one_cas(self, storage: Storage) -> None:
        etag = await storage.put("k", b"0")
        for n in range(1, 4):
            new = await storage.put("k", str(n).encode(), if_match=etag)
            with pytest.raises(PreconditionFailed):
                await storage.put("k", b"late", if_match=etag)
            etag = new
        assert await storage.get("k") == Blob(b"3", etag)

    async def test_unconditional_put_creates_and_overwrites(self, storage: Storage) -> None:
        await storage.put("k", b"v1")
        etag = await storage.put("k", b"v2")
        assert await storage.get("k") == Blob(b"v2", etag)
        [entry] = await storage.list("")
        assert (entry.etag, entry.size) == (etag, 2)


class DeleteTests:
    """``delete`` removes a key (only at ``if_match``, if given); a missing key is fine."""

    async def test_delete_of_a_missing_key_is_not_an_error(self, storage: Storage) -> None:
        await storage.delete("missing")
        await storage.delete("missing", if_match='"0123456789abcdef0123456789abcdef"')
        assert await storage.list("") == []

    async def test_delete_removes_the_key_from_get_and_list(self, storage: Storage) -> None:
        await storage.put("gone", b"x")
        await storage.put("kept", b"y")
        await storage.delete("gone")
        with pytest.raises(NotFound):
            await storage.get("gone")
        assert await _keys(storage) == ["kept"]

    async def test_conditional_delete_with_a_wrong_etag_fails_and_keeps_the_object(self, storage: Storage) -> None:
        """Or, on a store that cannot refuse it, the backend declares ``conditional_delete = False``
        (read after the call: a backend may learn it on first use) and the delete is a plain one."""
        stale = await storage.put("k", b"v1")
        current = await storage.put("k", b"v2")
        try:
            await storage.delete("k", if_match=stale)
        except PreconditionFailed:
            assert await storage.get("k") == Blob(b"v2", current)
            return
        declared = getattr(storage, "conditional_delete", None)
        assert declared is False, (
            f"delete(if_match=stale) did not refuse, yet conditional_delete is {declared!r}: "
            "a backend whose store ignores the condition must declare conditional_delete = False")
        with pytest.raises(NotFound):  # declared plain: it must then at least delete
            await storage.get("k")

    async def test_conditional_delete_with_the_current_etag_deletes(self, storage: Storage) -> None:
        etag = await storage.put("k", b"v1")
        await storage.delete("k", if_match=etag)
        with pytest.raises(NotFound):
            await storage.get("k")
        assert await storage.list("") == []

    async def test_delete_many_deletes_every_key_and_ignores_missing_ones(self, storage: Storage) -> None:
        doomed = {f"d/{i:03d}": b"x" for i in range(30)}
        await _put_all(storage, {**doomed, "d0": b"keep", "e/1": b"keep"})
        await delete_many(storage, [*doomed, "d/missing", "never/was"])
        await delete_many(storage, [])
        assert await _keys(storage) == ["d0", "e/1"]


class ListTests:
    """``list`` returns keys with a plain string prefix, in UTF-8 byte order, paged."""

    async def test_list_of_an_empty_root_is_empty(self, storage: Storage) -> None:
        assert await storage.list("") == []
        assert await storage.list("nothing/") == []

    async def test_list_is_in_lexicographic_order_even_across_directories(self, storage: Storage) -> None:
        await _put_all(storage, {k: k.encode() for k in TRICKY_KEYS})
        expected = _utf8_sorted(TRICKY_KEYS)
        assert expected == ["a-c", "a.b", "a/b-x", "a/b.c", "a/b/c", "a/b0", "a/bc", "a0", "ab"]
        assert await _keys(storage) == expected
        assert await _keys(storage, "a/") == ["a/b-x", "a/b.c", "a/b/c", "a/b0", "a/bc"]
        assert await _keys(storage, "a/b") == ["a/b-x", "a/b.c", "a/b/c", "a/b0", "a/bc"]

    async def test_list_prefix_is_a_plain_string_prefix(self, storage: Storage) -> None:
        keys = ["ready/1", "ready/1x", "ready/12/x", "ready/2", "ready0", "readz", "rea"]
        await _put_all(storage, {k: b"." for k in keys})
        assert await _keys(storage, "ready/1") == ["ready/1", "ready/12/x", "ready/1x"]
        assert await _keys(storage, "ready/12/") == ["ready/12/x"]
        assert await _keys(storage, "ready/") == ["ready/1", "ready/12/x", "ready/1x", "ready/2"]
        assert await _keys(storage, "ready") == ["ready/1", "ready/12/x", "ready/1x", "ready/2", "ready0"]
        assert await _keys(storage, "ready/3") == []
        assert await _keys(storage, "") == _utf8_sorted(keys)

    async def test_list_start_after_skips_keys_up_to_and_including_it(self, storage: Storage) -> None:
        await _put_all(storage, {k: b"." for k in TRICKY_KEYS})
        ordered = _utf8_sorted(TRICKY_KEYS)
        for i, key in enumerate(ordered):
            assert await _keys(storage, start_after=key) == ordered[i + 1 :], key
        assert await _keys(storage, "a/", start_after="a/b/c") == ["a/b0", "a/bc"]

    async def test_list_start_after_need_not_be_a_key(self, storage: Storage) -> None:
        await _put_all(storage, {k: b"." for k in TRICKY_KEYS})
        assert await _keys(storage, start_after="a/b") == ["a/b-x", "a/b.c", "a/b/c", "a/b0", "a/bc", "a0", "ab"]
        assert await _keys(storage, start_after="a/b/") == ["a/b/c", "a/b0", "a/bc", "a0", "ab"]
        assert await _keys(storage, start_after="a/b/d") == ["a/b0", "a/bc", "a0", "ab"]
        assert await _keys(storage, start_after="") == _utf8_sorted(TRICKY_KEYS)
        assert await _keys(storage, start_after="a") == _utf8_sorted(TRICKY_KEYS)
        assert await _keys(storage, start_after="b") == []
        assert await _keys(storage, "a/", start_after="0") == ["a/b-x", "a/b.c", "a/b/c", "a/b0", "a/bc"]
        assert await _keys(storage, "a/", start_after="a0") == []

    async def test_list_limit_caps_the_number_of_entries(self, storage: Storage) -> None:
        await _put_all(storage, {k: b"." for k in TRICKY_KEYS})
        ordered = _utf8_sorted(TRICKY_KEYS)
        for limit in (1, 3, len(ordered), 100):
            assert await _keys(storage, limit=limit) == ordered[:limit], limit
        assert await _keys(storage, "a/", start_after="a/b.c", limit=2) == ["a/b/c", "a/b0"]

    async def test_list_pages_through_more_than_a_thousand_keys(self, storage: Storage) -> None:
        keys = [f"page/{i:05d}" for i in range(PAGINATED_KEYS)]
        await _put_all(storage, {k: b"." for k in [*keys, "pagd", "pagf"]})
        first = await storage.list("page/")
        assert 0 < len(first) <= 1000 and [e.key for e in first] == keys[: len(first)]
        assert [e.key for e in await _list_all(storage, "page/")] == keys
        assert [e.key for e in await _list_all(storage, "", page=700)] == ["pagd", *keys, "pagf"]

    async def test_list_entries_carry_etag_and_size(self, storage: Storage) -> None:
        items = {"s/empty": b"", "s/one": b"1", "s/many": b"m" * 10_000}
        etags = await _put_all(storage, items)
        entries = await storage.list("s/")
        assert [e.key for e in entries] == ["s/empty", "s/many", "s/one"]
        for e in entries:
            assert (e.etag, e.size) == (etags[e.key], len(items[e.key])), e.key
        new = await storage.put("s/one", b"22", if_match=etags["s/one"])
        [entry] = await storage.list("s/one")
        assert (entry.etag, entry.size) == (new, 2)


class KeyTests:
    """Keys are ``/``-separated relative UTF-8 paths; anything else is refused up front."""

    async def test_unicode_keys_round_trip_and_list(self, storage: Storage) -> None:
        etags = await _put_all(storage, {k: k.encode() for k in UNICODE_KEYS})
        for key in UNICODE_KEYS:
            assert await storage.get(key) == Blob(key.encode(), etags[key]), key
        entries = await storage.list("tâches/")
        assert [e.key for e in entries] == UNICODE_KEYS
        assert [e.etag for e in entries] == [etags[k] for k in UNICODE_KEYS]
        assert await _keys(storage, "tâches/日本語/") == ["tâches/日本語/ключ-é.json"]
        assert await _keys(storage, start_after="tâches/日本語") == UNICODE_KEYS[2:]
        await storage.delete("tâches/日本語/ключ-é.json")
        assert await _keys(storage, "tâches/日") == []

    async def test_invalid_keys_are_rejected_before_anything_is_written(self, storage: Storage) -> None:
        calls: list[tuple[str, Callable[[str], Any]]] = [
            ("get", lambda k: storage.get(k)),
            ("put", lambda k: storage.put(k, b"x")),
            ("create-only put", lambda k: storage.put(k, b"x", if_none_match=True)),
            ("cas put", lambda k: storage.put(k, b"x", if_match='"x"')),
            ("delete", lambda k: storage.delete(k)),
            ("conditional delete", lambda k: storage.delete(k, if_match='"x"')),
        ]
        failures = []
        for key in INVALID_KEYS:
            for name, call in calls:
                try:
                    await call(key)
                except InvalidInput:
                    continue
                except Exception as exc:  # report every miss at once
                    failures.append(f"{name}({key[:20]!r}) raised {type(exc).__name__}: {exc}")
                else:
                    failures.append(f"{name}({key[:20]!r}) did not raise")
        assert not failures, "invalid keys not rejected with InvalidInput:\n" + "\n".join(failures)
        assert await storage.list("") == []

    async def test_a_long_key_within_the_limit_round_trips(self, storage: Storage) -> None:
        key = "/".join(["s" * 250, "t" * 99, "u" * 99])  # 450 bytes; a 250-byte segment
        assert len(key.encode()) < MAX_KEY_BYTES
        etag = await storage.put(key, b"long")
        assert await storage.get(key) == Blob(b"long", etag)
        assert await _keys(storage) == [key]

    async def test_a_key_below_another_key_is_stored_or_refused_cleanly(self, storage: Storage) -> None:
        """Object stores keep "a/b" and "a/b/c" side by side; a filesystem may refuse the
        second with StorageError, but must never lose or corrupt the first."""
        for first, second in (("a/b", "a/b/c"), ("x/y/z", "x/y")):
            etag = await storage.put(first, b"first")
            try:
                second_etag = await storage.put(second, b"second")
            except PreconditionFailed:
                pytest.fail(f"an unconditional put of {second!r} raised PreconditionFailed")
            except StorageError:
                assert await _keys(storage, first[0]) == [first]
            else:
                assert await _keys(storage, first[0]) == _utf8_sorted([first, second])
                assert await storage.get(second) == Blob(b"second", second_etag)
            assert await storage.get(first) == Blob(b"first", etag)

    async def test_a_key_can_be_created_where_deleted_keys_lived_below_it(self, storage: Storage) -> None:
        for data, below in ((b"here", "a/b/c"), (b"", "a/b/c"), (b"here", "a/b/c/d/e")):  # empty: a marker
            for put_kwargs in ({"if_none_match": True}, {}):
                await storage.put(below, b"below")
                await storage.delete(below)
                etag = await storage.put("a/b", data, **put_kwargs)
                assert await storage.get("a/b") == Blob(data, etag)
                assert await _keys(storage) == ["a/b"]
                await storage.delete("a/b")

    async def test_a_cas_where_deleted_keys_lived_below_finds_no_key(self, storage: Storage) -> None:
        etag = await storage.put("a/b/c", b"below")
        await storage.delete("a/b/c")
        with pytest.raises(PreconditionFailed):
            await storage.put("a/b", b"below", if_match=etag)
        assert await _keys(storage) == []

    async def test_a_cas_of_a_key_in_a_new_prefix_fails_and_writes_nothing(self, storage: Storage) -> None:
        for data in (b"x", b""):
            etag = await storage.put("elsewhere", data)
            await storage.delete("elsewhere")
            with pytest.raises(PreconditionFailed):
                await storage.put("new/deep/prefix/k", data, if_match=etag)
            assert await _keys(storage) == []
        etag = await storage.put("new/deep/prefix/k", b"", if_none_match=True)  # then created, as any
        assert await storage.get("new/deep/prefix/k") == Blob(b"", etag)


class LargeObjectTests:
    """Objects of several megabytes round trip whole, under every kind of put."""

    SIZE: ClassVar[int] = 5 * 1024 * 1024

    async def test_a_5mb_object_round_trips_with_a_consistent_etag(self, storage: Storage) -> None:
        rng = random.Random(5)
        first, second = rng.randbytes(self.SIZE), rng.randbytes(self.SIZE)
        etag = await storage.put("big.bin", first, if_none_match=True)
        assert await storage.get("big.bin") == Blob(first, etag)
        [entry] = await storage.list("big")
        assert (entry.etag, entry.size) == (etag, self.SIZE)
        new = await storage.put("big.bin", second, if_match=etag)
        assert new != etag
        assert await storage.get("big.bin") == Blob(second, new)


class RaceTests:
    """Conditional writes stay atomic under racers in other processes, threads and tasks.

    ``racers`` is ``processes`` (each opens the URL itself; skipped with the reason when
    ``multiprocess`` is False), ``threads`` in its place for a backend whose state lives
    in one process (each thread runs its own event loop and opens the URL itself), and
    always ``tasks``: asyncio tasks sharing the test's storage object.
    """

    multiprocess: ClassVar[bool]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "racers" in metafunc.fixturenames:
            kinds = ["processes", "tasks"] if self.multiprocess else ["processes", "threads", "tasks"]
            metafunc.parametrize("racers", kinds)

    async def _run_race(
        self, racers: str, storage: Storage, url: str, options: dict[str, Any], jobs: list[tuple[str, str, Any]]
    ) -> list[Any]:
        if racers == "processes" and not self.multiprocess:
            pytest.skip("multiprocess = False: the backend's state lives in one process (threads race it instead)")
        if racers == "processes":
            return await asyncio.to_thread(_run_processes, storage, url, options, jobs)
        if racers == "threads":
            return await asyncio.to_thread(_run_threads, url, options, jobs)
        coros = []
        for i, (op, key, arg) in enumerate(jobs):
            coros.append(_create_only(storage, key, i) if op == "create" else _increment(storage, key, arg, i))
        return await asyncio.wait_for(asyncio.gather(*coros), RACE_TIMEOUT)

    async def test_create_only_race_has_exactly_one_winner(
        self, racers: str, storage: Storage, storage_url: str, storage_options: dict[str, Any]
    ) -> None:
        jobs = [("create", "lock", None)] * RACERS
        results = await self._run_race(racers, storage, storage_url, storage_options, jobs)
        winners = [i for i, (outcome, _) in enumerate(results) if outcome == "won"]
        assert len(winners) == 1, f"create-only winners: {winners} (of {RACERS} racers)"
        assert sum(outcome == "lost" for outcome, _ in results) == RACERS - 1
        [winner] = winners
        assert await storage.get("lock") == Blob(_payload(winner), results[winner][1])

    async def test_cas_race_loses_no_update(
        self, racers: str, storage: Storage, storage_url: str, storage_options: dict[str, Any]
    ) -> None:
        await storage.put("counter", b"0")
        results = await self._run_race(
            racers, storage, storage_url, storage_options, [("cas", "counter", CAS_INCREMENTS)] * RACERS
        )
        final = (await storage.get("counter")).data.decode()
        landed = _landed(results, final)  # unknown outcomes (HTTP 500) that did land
        total = RACERS * CAS_INCREMENTS + len(landed)
        assert int(final.split()[0]) == total, "an increment was lost"
        written = sorted([v for r in results for v in r["won"]] + landed)
        assert written == list(range(1, total + 1)), "two racers won the CAS from the same etag"

    async def test_a_reader_never_sees_a_partial_object(
        self, storage: Storage, storage_url: str, storage_options: dict[str, Any]
    ) -> None:
        count, size, writes = 4, 1024 * 1024, 12
        initial = await storage.put("hot", _big_payload(0, size))
        arg = (count, size, writes)
        jobs = [("write", "hot", arg)] + [("read", "hot", arg)] * 3
        written, *reads = await asyncio.to_thread(_run_threads, storage_url, storage_options, jobs)
        versions = {*written, (initial, 0)}
        torn = [r for seen in reads for r in seen if r[1] < 0]
        assert not torn, f"{len(torn)} reads returned bytes that are no whole written payload"
        unmatched = [r for seen in reads for r in seen if r not in versions]
        assert not unmatched, f"reads whose etag is not the etag of the bytes read: {unmatched[:3]}"


class ConformanceTests(
    GetTests, CreateOnlyTests, CasTests, DeleteTests, ListTests, KeyTests, LargeObjectTests, RaceTests
):
    """The whole storage contract: combine with a :class:`StorageFixtures` subclass."""
