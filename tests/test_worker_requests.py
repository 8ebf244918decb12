"""A worker's record carries its queue's request counts (qo/meter.py), for the
dashboard's cost meter: ``requests`` since ``started_at`` and ``requests_per_minute``."""

from __future__ import annotations

import asyncio
import json

import attrs
import pytest

import qo
from qo import keys
from qo.counting import OPS, CountingStorage
from qo.meter import RequestRates, meter_of
from qo.worker import Worker


async def test_record_requests_match_a_counting_storage(storage_url, fast_settings):
    queue = await qo.connect(storage_url, queue="q", wrap_storage=CountingStorage)
    try:
        for i in range(6):
            await queue.submit("t", i)
        queue.storage.reset()
        worker = Worker(queue, settings=attrs.evolve(fast_settings, heartbeat_interval=0.1, concurrency=2))
        seen: dict = {}

        @worker.handler("t")
        async def t(value):
            if value == 5:  # while busy: our stored record carries the counts
                for _ in range(100):
                    mine = [w for w in (await queue.stats())["workers"] if w["worker_id"] == worker.worker_id]
                    if mine and sum(mine[0]["requests"].values()) and sum(mine[0]["requests_per_minute"].values()):
                        seen.update(mine[0])
                        break
                    await asyncio.sleep(0.05)
            return value

        await worker.run(until_idle=True)
        since, per_minute = worker.book.requests.sample()
        assert since == queue.storage.snapshot()["counts"]  # the same requests, counted the same way
        assert set(since) == set(OPS) and since["GET"] > 0 and since["PUT_COND"] >= 12  # claim + finish of 6
        assert set(seen["requests"]) == set(OPS) and set(seen["requests_per_minute"]) == set(OPS)
        assert all(v >= 0 for v in seen["requests_per_minute"].values())
        assert sum(seen["requests_per_minute"].values()) > 0
    finally:
        await queue.close()


async def test_a_batch_delete_counts_as_one_request(storage_url):
    """The meter counts what a backend sends: a delete_many is one DELETE_BATCH, never a
    DELETE per key as well (the local store used to delete through its own metered
    ``delete``, so a worker's record over-counted its deletes)."""
    queue = await qo.connect(storage_url, queue="q")
    try:
        keys_ = [f"q/ready/x{i}" for i in range(3)]
        for key in keys_:
            await queue.backend.put(key, b"")
        before = queue.requests.counts()
        await queue.backend.delete_many(keys_)
        after = queue.requests.counts()
        assert {op: after[op] - before.get(op, 0) for op in after if after[op] != before.get(op, 0)} \
            == {"DELETE_BATCH": 1}
        assert await queue.backend.list("q/ready/") == []
    finally:
        await queue.close()


async def test_the_meter_keeps_the_storage_object_and_counts_failures(tmp_path):
    queue = await qo.connect(str(tmp_path / "s"), queue="q")
    storage = queue.backend
    assert meter_of(storage) is queue.requests and queue.requests.installed
    assert type(storage).__module__.startswith("qo_local")  # not wrapped: the same object
    with pytest.raises(qo.TaskNotFound):
        await queue.get("0" * 24)  # two GETs: the queue's settings (its key layout), then the task
    await storage.put("x/a", b"1")
    with pytest.raises(qo.PreconditionFailed):
        await storage.put("x/a", b"2", if_none_match=True)
    await storage.list("x/")
    await storage.delete("x/a")
    counts = queue.requests.counts()
    assert counts["GET"] == 2 and counts["PUT"] == 1 and counts["PUT_COND"] == 1
    assert counts["LIST"] == 1 and counts["DELETE"] == 1
    again = await qo.connect(str(tmp_path / "s"), queue="other")
    assert again.requests is not queue.requests  # another storage object, its own meter
    await again.close()
    await queue.close()


def test_requests_per_minute_over_the_last_minute():
    class Clock:
        t = 1000.0

        def now(self):
            return self.t

    meter, clock = meter_of(_Null()), Clock()
    rates = RequestRates(meter, clock)
    for _ in range(12):  # 6 GETs every 10 s: 36 a minute
        clock.t += 10
        meter.add("GET", 6)
        since, per_minute = rates.sample()
    assert since["GET"] == 72 and per_minute["GET"] == 36.0 and per_minute["PUT"] == 0.0
    clock.t += 30  # quiet for 30 s: half the window saw nothing
    assert rates.sample()[1]["GET"] == pytest.approx(18 * 60 / 60, rel=0.2)


class _Null:
    async def get(self, key):
        raise KeyError(key)

    async def put(self, key, data, *, if_match=None, if_none_match=False):
        return "e"

    async def delete(self, key, *, if_match=None):
        return None

    async def list(self, prefix, *, start_after=None, limit=1000):
        return []


async def test_stats_shows_empty_requests_for_an_older_workers_record(queue):
    now = queue.clock.now()
    record = {"worker_id": "old-1-abcdef", "heartbeat_at": now, "lease_ttl": 30, "leases": {},
              "started_at": now, "counts": {"completed": 3}}
    await queue.storage.put(keys.worker(queue.name, "old-1-abcdef"), json.dumps(record).encode())
    (entry,) = (await queue.stats())["workers"]
    assert entry["requests"] == {} and entry["requests_per_minute"] == {} and entry["completed"] == 3
