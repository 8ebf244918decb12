"""qo.testing.faults.FaultyStorage: each kind of fault does what it says, on both backends."""

from __future__ import annotations

import time

import pytest

import qo
from qo.backends import open_storage
from qo.errors import NotFound, PreconditionFailed, StorageUnavailable
from qo.testing.faults import FaultyStorage


@pytest.fixture
async def inner(storage_url):
    s = open_storage(storage_url)
    yield s
    await s.close()


async def test_error_rate_raises_before_the_call_and_nothing_changes(inner):
    f = FaultyStorage(inner, seed=1, error_rate=1.0)
    with pytest.raises(StorageUnavailable, match="injected"):
        await f.put("a/x", b"1", if_none_match=True)
    with pytest.raises(NotFound):
        await inner.get("a/x")
    for call in (lambda: f.get("a/x"), lambda: f.list("a/"), lambda: f.delete("a/x"), lambda: f.put("a/y", b"")):
        with pytest.raises(StorageUnavailable):
            await call()
    assert await inner.list("a/") == []
    assert f.injected()["error"] == 5
    assert f.injected()["error:put"] == 2 and f.injected()["landed_error"] == 0


async def test_landed_error_changes_the_object_and_reports_failure(inner):
    f = FaultyStorage(inner, seed=1, landed_error_rate=1.0)
    with pytest.raises(StorageUnavailable, match="landed"):
        await f.put("a/x", b"1", if_none_match=True)
    assert (await inner.get("a/x")).data == b"1"
    etag = (await inner.get("a/x")).etag
    with pytest.raises(StorageUnavailable):
        await f.put("a/x", b"2", if_match=etag)
    assert (await inner.get("a/x")).data == b"2"
    with pytest.raises(StorageUnavailable):
        await f.put("a/m", b"")  # a plain put lands too
    assert (await inner.get("a/m")).data == b""
    with pytest.raises(StorageUnavailable):
        await f.delete("a/x")
    with pytest.raises(NotFound):
        await inner.get("a/x")
    if hasattr(inner, "delete_many"):
        assert hasattr(f, "delete_many")
        with pytest.raises(StorageUnavailable):
            await f.delete_many(["a/m"])
        with pytest.raises(NotFound):
            await inner.get("a/m")
    else:
        assert not hasattr(f, "delete_many")
    assert f.injected()["landed_error"] >= 4


async def test_lost_response_only_for_conditional_writes_that_landed(inner):
    f = FaultyStorage(inner, seed=1, lost_response_rate=1.0)
    with pytest.raises(StorageUnavailable, match="lost_response"):
        await f.put("a/x", b"1", if_none_match=True)
    assert (await inner.get("a/x")).data == b"1"
    # a refused condition is reported as such, not as a lost response
    with pytest.raises(PreconditionFailed):
        await f.put("a/x", b"2", if_none_match=True)
    # plain puts, reads and deletes are not affected
    await f.put("a/m", b"")
    assert (await f.get("a/m")).data == b""
    await f.delete("a/m")
    assert f.injected()["lost_response"] == 1
    assert f.injected()["lost_response:put"] == 1


async def test_latency_fixed_and_jittered(inner):
    f = FaultyStorage(inner, latency=0.05)
    t0 = time.monotonic()
    await f.put("a/x", b"1")
    assert time.monotonic() - t0 >= 0.05
    j = FaultyStorage(inner, seed=3, latency=(0.0, 0.02))
    for _ in range(5):
        await j.get("a/x")
    assert 1 <= j.injected()["latency"] <= 5
    with pytest.raises(ValueError):
        FaultyStorage(inner, latency=(0.2, 0.1))


async def test_ops_restricts_injection(inner):
    f = FaultyStorage(inner, seed=1, error_rate=1.0, ops={"get"})
    await f.put("a/x", b"1")
    assert await f.list("a/")
    with pytest.raises(StorageUnavailable):
        await f.get("a/x")
    c = FaultyStorage(inner, seed=1, error_rate=1.0, ops=["put_cond"])
    await c.put("a/y", b"plain")
    with pytest.raises(StorageUnavailable):
        await c.put("a/z", b"cond", if_none_match=True)
    with pytest.raises(ValueError, match="unknown"):
        FaultyStorage(inner, ops={"post"})
    with pytest.raises(ValueError):
        FaultyStorage(inner, error_rate=1.5)


async def test_seeded_decisions_are_deterministic_and_rates_hold(inner):
    async def run(seed):
        f = FaultyStorage(inner, seed=seed, error_rate=0.3)
        out = []
        for _ in range(200):
            try:
                await f.list("a/")
                out.append(0)
            except StorageUnavailable:
                out.append(1)
        return out

    a, b, c = await run(7), await run(7), await run(8)
    assert a == b and a != c
    assert 30 <= sum(a) <= 90  # about 60


async def test_disabled_passes_everything_and_wrapper_forwards(inner):
    f = FaultyStorage(inner, error_rate=1.0)
    f.enabled = False
    await f.put("a/x", b"1")
    assert (await f.get("a/x")).data == b"1"
    assert f.name == inner.name
    assert isinstance(f.clock_offset, float)
    assert f.injected()["error"] == 0


async def test_the_engine_survives_faults_through_connect(storage_url):
    made = []

    def wrap(s):
        made.append(FaultyStorage(s, seed=11, error_rate=0.1, landed_error_rate=0.05, lost_response_rate=0.1))
        return made[0]

    q = await qo.connect(storage_url, queue="faulty", wrap_storage=wrap)
    assert q.backend is made[0]
    tasks = [await q.submit("t", i) for i in range(20)]
    ids = {t.id for t in tasks}
    made[0].enabled = False
    assert {t.id async for t in q.list(limit=None)} == ids
    assert sum(v for k, v in made[0].injected().items() if ":" not in k) > 0
    await q.close()
