"""Throttling: the store says "slow down" (S3 ``503 SlowDown``, Azure ``ServerBusy``, a
429). It is a kind of its own (``qo.Throttled``), retried from a longer wait
(``qo.store.Backoff``)."""

from __future__ import annotations


import pytest

import qo
from qo.errors import StorageUnavailable, Throttled
from qo.store import Backoff
from qo.testing.faults import FaultyStorage


class FakeTime:
    """A clock and a sleep that advances it (no real waiting)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


# -- Backoff ------------------------------------------------------------------------


def test_a_throttle_waits_from_a_larger_base_with_full_jitter():
    b = Backoff()
    throttle, plain = Throttled("slow down"), StorageUnavailable("reset")
    first_plain = [b.delay(1, plain) for _ in range(300)]
    first_throttle = [b.delay(1, throttle) for _ in range(300)]
    assert max(first_plain) <= 0.1 and max(first_throttle) <= 0.4  # base * 2**1
    assert max(first_throttle) > 0.3 and min(first_throttle) < 0.05  # drawn over all of [0, 0.4]
    late_throttle = [b.delay(9, throttle) for _ in range(300)]
    assert max(b.delay(9, plain) for _ in range(300)) <= 2.0
    assert 4.5 < max(late_throttle) <= 5.0  # capped at throttle_cap
    assert b.delay(10**6, throttle) <= 5.0  # no overflow on a long outage
    assert Backoff(cap=8.0).throttle_cap == 8.0  # never below the plain cap


async def test_backoff_retries_throttles_then_gives_up():
    fake = FakeTime()
    b = Backoff(attempts=5, sleep=fake.sleep)
    calls = []

    async def throttled_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise Throttled("slow down", backend="s3", key="q/tasks/x.json")
        return "ok"

    assert await b.call(throttled_twice) == "ok"
    assert len(calls) == 3 and len(fake.slept) == 2
    assert fake.slept[0] <= 0.4 and fake.slept[1] <= 0.8

    async def always():
        raise Throttled("slow down")

    fake.slept.clear()
    with pytest.raises(Throttled):
        await b.call(always)
    assert len(fake.slept) == 4  # 5 tries, a wait between each


async def test_task_writes_back_off_from_throttles_and_land_once(storage_url):
    """Creates and compare-and-swaps retried through throttles: every task written
    once, every cancel applied; each throttle cost one wait (a fake sleep)."""
    made: list[FaultyStorage] = []

    def wrap(storage):
        made.append(FaultyStorage(storage, seed=3, throttle_rate=0.5, ops={"put_cond"}))
        return made[0]

    fake = FakeTime()
    q = await qo.connect(storage_url, queue="q", wrap_storage=wrap)
    try:
        q.store.backoff = Backoff(sleep=fake.sleep)
        tasks = [await q.submit("t", i) for i in range(8)]
        for t in tasks:
            await q.cancel(t.id)
        throttles = made[0].injected()["throttle"]
        assert throttles > 0 and len(fake.slept) == throttles
        assert all(s <= 5.0 for s in fake.slept)
        made[0].enabled = False
        listed = [t async for t in q.list(limit=None)]
        assert sorted(t.id for t in listed) == sorted(t.id for t in tasks)
        assert {t.status for t in listed} == {"cancelled"}
    finally:
        await q.close()
