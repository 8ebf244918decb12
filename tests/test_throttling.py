"""Throttling: the store says "slow down" (S3 ``503 SlowDown``, Azure ``ServerBusy``, a
429). It is a kind of its own (``qo.Throttled``), retried from a longer wait
(``qo.store.Backoff``); the S3 backend paces a throttled prefix
(``qo.backend_kit.Pacer``); a test server throttles per prefix
(``qo.testing.slowdown.SlowDown``); and a worker drains a throttled prefix."""

from __future__ import annotations

import asyncio
import io

import attrs
import pytest

import qo
from qo.backend_kit import Pacer
from qo.errors import StorageUnavailable, Throttled
from qo.store import Backoff
from qo.testing.faults import FaultyStorage
from qo.testing.slowdown import SLOWDOWN_BODY, SlowDown, partition_of


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


# -- Pacer --------------------------------------------------------------------------


async def test_the_pacer_paces_a_prefix_only_once_it_was_throttled():
    fake = FakeTime()
    p = Pacer(clock=fake.now, sleep=fake.sleep)
    assert p.partition("q/tasks/abc.json") == "q/tasks/" and p.partition("q/ready/128/x") == "q/ready/"
    assert p.partition("q/settings.json") == "q/" and p.partition(None) == ""
    part = "q/tasks/"
    for _ in range(40):  # 40 accepted within a second: no pacing, no waiting
        sent = await p.wait(part)
        p.done(part, sent, throttled=False)
        fake.t += 0.01
    assert fake.slept == [] and p.rate(part) is None
    p.done(part, fake.t, throttled=True)
    assert p.rate(part) == pytest.approx(0.7 * 40)  # from what the store accepted
    assert p.rate("q/ready/") is None  # other prefixes go on unpaced
    start = fake.t
    for _ in range(10):
        await p.wait(part)
    # spaced at ~1/28 s (the rate grows a little with each request sent)
    assert 9 / 29 < fake.t - start < 9 / 27


async def test_the_pacer_decreases_once_per_window_grows_with_use_and_lets_go():
    fake = FakeTime()
    p = Pacer(clock=fake.now, sleep=fake.sleep, floor=5.0, quiet=60.0)
    part = "q/tasks/"
    p.done(part, fake.t, throttled=True)
    assert p.rate(part) == 5.0  # nothing accepted yet: the floor
    fake.t += 2.0
    rate = p.rate(part)
    sent = await p.wait(part)
    assert p.rate(part) > rate  # sending grows it
    p.done(part, sent, throttled=True)
    rate = p.rate(part)
    assert rate == pytest.approx(5.0)  # 0.7 x, but never below the floor
    p = Pacer(clock=fake.now, sleep=fake.sleep)
    for _ in range(100):
        p.done(part, fake.t, throttled=False)
    p.done(part, fake.t, throttled=True)
    assert p.rate(part) == pytest.approx(70.0)
    p.done(part, fake.t + 0.5, throttled=True)  # sent before the store forgot the old pace
    assert p.rate(part) == pytest.approx(70.0)
    fake.t += 1.5
    p.done(part, fake.t, throttled=True)
    assert p.rate(part) == pytest.approx(49.0)
    for _ in range(49):  # a second's worth at the full rate: +20 %
        await p.wait(part)
    assert p.rate(part) == pytest.approx(49.0 * 1.2, rel=0.03)
    assert p.throttles == 3
    fake.t += 61.0  # a quiet minute: no longer paced
    slept = len(fake.slept)
    await p.wait(part)
    assert p.rate(part) is None and len(fake.slept) == slept


# -- the SlowDown middleware ----------------------------------------------------------------


def _environ(method: str, path: str, query: str = "", body: bytes = b"") -> dict:
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
            "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}


def test_slowdown_partitions_like_s3_and_refuses_above_the_rate():
    assert partition_of("b", "q/tasks/x.json", 2) == "b/q/tasks/"
    assert partition_of("b", "p/q/tasks/x.json", 3) == "b/p/q/tasks/"
    assert partition_of("b", "q/x.json", 2) == "b/q/" and partition_of("b", "", 2) == "b/"
    now = [0.0]
    s = SlowDown(3, clock=lambda: now[0])
    assert s.partition(_environ("GET", "/b/q/tasks/x.json")) == "b/q/tasks/"
    assert s.partition(_environ("GET", "/b", "list-type=2&prefix=q%2Fready%2F128%2F")) == "b/q/ready/"
    body = b"<Delete><Object><Key>q/ready/128/0001-a-t</Key></Object><Quiet>true</Quiet></Delete>"
    env = _environ("POST", "/b", "delete", body)
    assert s.partition(env) == "b/q/ready/"
    assert env["wsgi.input"].read() == body  # put back for moto

    served = []
    app = s(lambda environ, start: served.append(1) or [b"ok"])
    statuses = []
    for _ in range(5):
        out = app(_environ("PUT", "/b/q/tasks/x.json", body=b"{}"), lambda st, h: statuses.append(st))
        now[0] += 0.1
    assert len(served) == 3 and statuses == ["503 Slow Down", "503 Slow Down"] and out == [SLOWDOWN_BODY]
    app(_environ("GET", "/b/q/ready/1"), lambda st, h: statuses.append(st))  # another prefix
    now[0] = 1.05  # the first admission left the window
    app(_environ("GET", "/b/q/tasks/x.json"), lambda st, h: statuses.append(st))
    assert len(served) == 5
    stats = s.stats(reset=True)
    assert (stats["requests"], stats["slowdowns"]) == (7, 2)
    assert stats["partitions"]["b/q/tasks/"] == {"requests": 6, "slowdowns": 2, "peak": 5}
    assert s.stats()["slowdowns"] == 0 and s.slowdowns == 0
    with pytest.raises(ValueError):
        SlowDown(0)


# -- S3: a worker drains a throttled prefix ------------------------------------------------


@pytest.fixture(scope="module")
def throttled_s3():
    """A moto server of its own that answers 503 SlowDown above 40 requests/s per
    ``bucket/{queue}/{kind}/`` (a test sets ``throttle.rate`` as it needs)."""
    from qo.testing.moto import MotoServer

    throttle = SlowDown(40)
    server = MotoServer(middleware=throttle)
    server.start()
    yield server, throttle
    server.stop()


async def test_a_worker_drains_a_throttled_prefix_backing_off(throttled_s3, fast_settings):
    """S3 only: SlowDown is S3's answer to a hot prefix (the local store never throttles;
    Azure's ServerBusy is mapped to the same Throttled and retried by the same Backoff).

    40 requests/s per prefix; 30 tasks need ~120 requests to ``q/tasks/`` (create, claim
    GET and CAS, outcome CAS), which one worker of 8 slots asks for at ~150/s. Every
    task completes once; the server sent SlowDowns; and the client kept close to the
    allowed rate instead of hammering: few refusals, no second much above the rate."""
    server, throttle = throttled_s3
    throttle.rate = 40
    url = server.new_bucket()  # no prefix: keys are q/tasks/..., each kind a partition
    bucket = url.split("/")[2]
    q = await qo.connect(url, queue="q")
    try:
        q.store.backoff = Backoff(cap=1.0, throttle_cap=1.0)  # no wait in this test longer than 1 s
        await q.submit_many([("t", i) for i in range(30)], bulk=False)  # one object each: ~4 requests per task
        worker = qo.Worker(q, settings=attrs.evolve(fast_settings, concurrency=8))
        ran: list[int] = []

        @worker.handler("t")
        async def t(value):
            ran.append(value)

        await asyncio.wait_for(worker.run(until_idle=True), 30)
        assert sorted(ran) == list(range(30))  # every task ran, once
        assert {task.status async for task in q.list(limit=None)} == {"completed"}
    finally:
        await q.close()
    stats = throttle.stats()
    tasks = stats["partitions"][f"{bucket}/q/tasks/"]
    assert tasks["slowdowns"] > 0 and q.storage.pacer.throttles > 0
    mine = [p for name, p in stats["partitions"].items() if name.startswith(bucket + "/")]
    requests, slowdowns = sum(p["requests"] for p in mine), sum(p["slowdowns"] for p in mine)
    assert slowdowns < 0.15 * requests, (slowdowns, requests)
    assert tasks["slowdowns"] < 0.25 * tasks["requests"], tasks
    assert tasks["peak"] <= 2 * 40, tasks  # requests arriving within any one second


async def test_a_spread_queue_puts_a_throttled_load_on_its_shards(throttled_s3, fast_settings):
    """The same load as above, 40 requests/s per partition, S3 partitioning each
    ``{queue}/{kind}/{shard}/``: the flat queue's tasks all hit ``q/tasks/`` and are
    throttled; a queue laid out in 8 shards spreads them over 8 partitions, each far
    under the rate, and is throttled less (S3 only: see above)."""
    server, throttle = throttled_s3
    throttle.rate, throttle.depth = 40, 3
    outcome = {}
    try:
        for name, shards in (("flat", 1), ("spread", 8)):
            url = server.new_bucket()
            bucket = url.split("/")[2]
            q = await qo.connect(url, queue="q")
            try:
                q.store.backoff = Backoff(cap=1.0, throttle_cap=1.0)
                if shards > 1:
                    await q.set_layout(shards)
                await q.submit_many([("t", i) for i in range(30)], bulk=False)
                worker = qo.Worker(q, settings=attrs.evolve(fast_settings, concurrency=8))
                ran: list[int] = []
                worker.handler("t")(ran.append)
                await asyncio.wait_for(worker.run(until_idle=True), 30)
                assert sorted(ran) == list(range(30))  # every task ran, once
            finally:
                await q.close()
            parts = {p: v for p, v in throttle.stats()["partitions"].items() if p.startswith(f"{bucket}/q/tasks/")}
            outcome[name] = parts
    finally:
        throttle.depth = 2
    [(flat_name, flat)] = outcome["flat"].items()
    assert flat_name.endswith("/q/tasks/") and flat["slowdowns"] > 0
    spread = {n: p for n, p in outcome["spread"].items() if not n.endswith("/q/tasks/")}
    assert outcome["spread"][flat_name.replace(flat_name.split("/")[0], next(iter(spread)).split("/")[0])] == {
        "requests": 1, "slowdowns": 0, "peak": 1}  # only set_layout's look for a first task
    assert {n.split("/")[-2] for n in spread} <= {f"{s:02x}" for s in range(8)} and len(spread) >= 5  # 30 ids drawn
    assert sum(p["requests"] for p in spread.values()) >= 4 * 30  # create, claim GET + CAS, outcome
    assert all(p["peak"] <= 40 for p in spread.values()), spread  # each shard under the rate
    assert sum(p["slowdowns"] for p in spread.values()) < flat["slowdowns"]
