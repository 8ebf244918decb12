"""CountingStorage counts every request by operation, on every backend; LatencyStorage delays."""

from __future__ import annotations

import asyncio
import time

import pytest

import qo
from qo.backends import open_storage
from qo.counting import OPS, CountingStorage, LatencyStorage
from qo.storage import Blob, Entry, delete_many
from qo.worker import Worker


@pytest.fixture
async def counted(storage_url: str):
    storage = CountingStorage(open_storage(storage_url))
    try:
        yield storage
    finally:
        await storage.close()


async def test_counts_each_operation(counted: CountingStorage) -> None:
    assert counted.counts() == {}
    await counted.put("a/one", b"1")
    assert counted.counts() == {"PUT": 1}
    etag = await counted.put("a/two", b"2", if_none_match=True)
    await counted.put("a/two", b"22", if_match=etag)
    assert counted.counts() == {"PUT": 1, "PUT_COND": 2}
    blob = await counted.get("a/two")
    assert blob.data == b"22"
    listed = await counted.list("a/")
    assert [e.key for e in listed] == ["a/one", "a/two"]
    await counted.delete("a/one")
    await counted.delete_many(["a/two", "a/missing"])
    assert await counted.list("a/") == []
    assert counted.counts() == {"PUT": 1, "PUT_COND": 2, "GET": 1, "LIST": 2, "DELETE": 1, "DELETE_BATCH": 1}
    assert counted.failures() == {}
    assert counted.total == 8


async def test_failures_are_requests_too(counted: CountingStorage) -> None:
    with pytest.raises(qo.NotFound):
        await counted.get("nope")
    await counted.put("k", b"x", if_none_match=True)
    with pytest.raises(qo.PreconditionFailed):
        await counted.put("k", b"y", if_none_match=True)
    with pytest.raises(qo.PreconditionFailed):
        await counted.put("k", b"y", if_match='"not-the-etag"')
    assert counted.counts() == {"GET": 1, "PUT_COND": 3}
    assert counted.failures() == {"GET:NotFound": 1, "PUT_COND:PreconditionFailed": 2}


async def test_delete_many_is_one_request_per_thousand_keys(counted: CountingStorage) -> None:
    await counted.put("m/a", b"")
    counted.reset()
    await delete_many(counted, ["m/a"] + [f"m/missing-{i}" for i in range(2499)])
    assert counted.counts() == {"DELETE_BATCH": 3}
    assert await counted.list("m/") == []


async def test_snapshot_reset_and_passthrough(counted: CountingStorage, backend: str) -> None:
    await counted.put("s/x", b"x")
    snap = counted.snapshot()
    assert list(snap["counts"])[: len(OPS)] == list(OPS)
    assert snap["counts"]["PUT"] == 1 and snap["counts"]["GET"] == 0
    assert snap["total"] == 1 and snap["failures"] == {}
    snap["counts"]["PUT"] = 99  # a copy
    assert counted.counts() == {"PUT": 1}
    counted.reset()
    assert counted.counts() == {} and counted.snapshot()["total"] == 0
    assert counted.name == counted.inner.name == backend
    assert counted.clock_offset == float(getattr(counted.inner, "clock_offset", 0.0) or 0.0)
    assert repr(counted.inner) in repr(counted)
    assert isinstance(counted, qo.Storage)


class _Plain:
    """A minimal backend without delete_many (and a clock offset of its own)."""

    name = "plain"
    clock_offset = 1.5

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def get(self, key: str) -> Blob:
        if key not in self.objects:
            raise qo.NotFound("no such key", backend=self.name, key=key)
        return Blob(self.objects[key], "e")

    async def put(self, key, data, *, if_match=None, if_none_match=False) -> str:
        self.objects[key] = bytes(data)
        return "e"

    async def delete(self, key, *, if_match=None) -> None:
        self.objects.pop(key, None)

    async def list(self, prefix, *, start_after=None, limit=1000) -> list[Entry]:
        return [Entry(k, "e", len(v)) for k, v in sorted(self.objects.items()) if k.startswith(prefix)][:limit]

    async def close(self) -> None:
        pass


async def test_no_delete_many_unless_the_backend_has_it() -> None:
    counted = CountingStorage(_Plain())
    assert not hasattr(counted, "delete_many")
    assert not hasattr(LatencyStorage(_Plain(), 0), "delete_many")
    assert counted.clock_offset == 1.5 and counted.name == "plain"
    await counted.put("a", b"")
    await counted.put("b", b"")
    await delete_many(counted, ["a", "b", "c"])  # falls back to one delete per key
    assert counted.counts() == {"PUT": 2, "DELETE": 3}


async def test_list_counts_pages_when_the_backend_pages() -> None:
    inner = _Plain()
    inner.page_size = 2  # type: ignore[attr-defined]
    for k in "abcde":
        inner.objects[k] = b""
    counted = CountingStorage(inner)
    await counted.list("", limit=1000)
    assert counted.counts() == {"LIST": 3}


async def test_latency_storage_waits_before_each_call() -> None:
    slow = CountingStorage(LatencyStorage(_Plain(), 0.05))
    assert slow.clock_offset == 1.5
    t0 = time.perf_counter()
    await asyncio.gather(slow.put("a", b"1"), slow.get("a"))  # concurrent: one delay, not two
    await slow.list("")
    elapsed = time.perf_counter() - t0
    assert 0.09 <= elapsed < 0.5
    assert slow.counts() == {"PUT": 1, "GET": 1, "LIST": 1}
    with pytest.raises(ValueError):
        LatencyStorage(_Plain(), -1)


async def test_submit_and_drain_stay_within_the_request_budget(storage_url: str) -> None:
    """DESIGN.md section 6: at most 6 requests per task on the happy path, amortised."""
    n = 20
    queue = await qo.connect(storage_url, queue="budget", wrap_storage=CountingStorage)
    counter = queue.backend
    assert isinstance(counter, CountingStorage)
    try:
        await queue.submit_many([("noop", {"i": i}) for i in range(n)], bulk=False)  # the single path (packs: test_packs.py)
        submit = counter.counts()
        assert submit.get("PUT_COND") == n and submit.get("PUT") == n  # task + ready marker
        counter.reset()

        worker = Worker(queue, concurrency=4, poll_max=0.2)
        worker.handler("noop")(lambda payload: None)
        stats = await asyncio.wait_for(worker.run(until_idle=True), 60)
        assert stats["completed"] == n
        drain = counter.counts()
    finally:
        await queue.close()

    total = {op: submit.get(op, 0) + drain.get(op, 0) for op in set(submit) | set(drain)}
    assert total["PUT_COND"] >= 3 * n  # create, claim, complete
    assert drain.get("PUT", 0) == 0  # no marker rewritten on the happy path
    assert sum(total.values()) <= 6 * n + 30, total
