"""Leases, recovery and marker repair, on both backends, mostly on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

import qo
from clocks import ticking_queue
from qo import keys
from qo.clock import FakeClock
from qo.errors import StorageUnavailable
from qo.leases import LeaseBook, sweep
from qo.model import PENDING
from qo.transitions import Claimed, claim, failed, finish
from qo.worker import Worker


@pytest.fixture
async def clocked(storage_url):
    """A queue on a fake clock that a background task moves 10x faster than real time."""
    async with ticking_queue(storage_url, "rec", speed=10.0) as (q, clock):
        yield q, clock


async def claim_as(q, book: LeaseBook, task) -> Claimed:
    marker = keys.parse_marker(task.marker_key(q.name, q.clock.now()))
    await book.announce({task.id: {"lease": "L-" + book.worker_id, "type": task.task_type}})
    result = await claim(q.store, marker, worker_id=book.worker_id, lease_id="L-" + book.worker_id,
                         lease_ttl=book.lease_ttl, now=q.clock.now())
    assert isinstance(result, Claimed)
    return result


async def test_heartbeat_renews_every_lease_and_silence_loses_them(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="lease", clock=clock)
    a, b = await q.submit("t", 1), await q.submit("t", 2)
    book = LeaseBook(q.store, "worker-a", clock, lease_ttl=30)
    await claim_as(q, book, a)
    await claim_as(q, book, b)

    clock.advance(25)
    await book.write()  # one heartbeat renews both leases
    clock.advance(25)   # 50 s after the claim, 25 s after the heartbeat: alive
    report = await sweep(q.store, clock, self_id="other")
    assert report.recovered == [] and set(report.alive) == {"worker-a"}
    assert (await q.get(a.id)).status == "running"

    clock.advance(31)   # silent for longer than the lease
    report = await sweep(q.store, clock, self_id="other")
    assert sorted(report.recovered) == sorted([a.id, b.id])
    for t in (a, b):
        back = await q.get(t.id)
        assert back.status == "pending" and back.attempt == 1 and back.worker_id is None
        assert back.last_error["type"] == "LeaseExpired"
        marker = back.marker_key(q.name, clock.now())
        assert [e.key for e in await q.storage.list(marker)] == [marker]
    assert await q.storage.list(keys.workers_prefix(q.name)) == []  # the record was removed

    # the evicted worker finds out on its next write, and starts a fresh record
    await book.write()
    assert book.evictions == 1
    assert [e.key for e in await q.storage.list(keys.workers_prefix(q.name))] == [book.key]
    await q.close()


async def test_a_task_that_keeps_killing_its_workers_ends_in_the_dead_letter(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="poison", clock=clock)
    task = await q.submit("poison", None, max_retries=1)
    for round in range(2):
        book = LeaseBook(q.store, f"victim-{round}", clock, lease_ttl=10)
        current = await q.get(task.id)
        await claim_as(q, book, current)
        clock.advance(11)
        await sweep(q.store, clock, self_id="survivor")
    dead = await q.get(task.id)
    assert dead.status == "failed" and dead.attempt == 2 and dead.last_error["type"] == "LeaseExpired"
    await q.close()


async def test_recovery_writes_the_marker_a_crashed_worker_never_wrote(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="repair", clock=clock)
    task = await q.submit("t", None)
    book = LeaseBook(q.store, "crashy", clock, lease_ttl=10)
    got = await claim_as(q, book, task)
    await q.store.delete_markers([task.marker_key(q.name, clock.now())])  # the claimer's batch delete
    # the attempt fails and is rescheduled (task written) ... and the worker dies before the marker
    now = clock.now()
    stored = await finish(q.store, got.task, got.etag, failed(RuntimeError("x"), 0.0, now), now)
    assert stored[0].status == PENDING
    assert await q.storage.list(keys.ready_prefix(q.name)) == []
    clock.advance(11)
    await sweep(q.store, clock, self_id="other")
    back = await q.get(task.id)
    assert [e.key for e in await q.storage.list(keys.ready_prefix(q.name))] == [back.marker_key(q.name, clock.now())]
    await q.close()


async def test_lease_renewal_keeps_a_long_task_from_running_twice(clocked):
    q, clock = clocked
    task = await q.submit("long", None, timeout_seconds=600)
    runs = []
    release = asyncio.Event()
    a = Worker(q, concurrency=1, lease_ttl=1.0, poll_min=0.01, poll_max=0.05, sweep_interval=0.2)
    b = Worker(q, concurrency=1, lease_ttl=1.0, poll_min=0.01, poll_max=0.05, sweep_interval=0.2)

    @a.handler("long")
    async def long_a(input, ctx):
        runs.append("a")
        await release.wait()
        return "a"

    @b.handler("long")
    async def long_b(input, ctx):
        runs.append("b")
        return "b"

    ra = asyncio.create_task(a.run())
    while not runs:
        await asyncio.sleep(0.01)
    rb = asyncio.create_task(b.run())
    start = clock.now()
    while clock.now() - start < 10:  # ten leases long, while b sweeps every ~0.2 s
        await asyncio.sleep(0.01)
    release.set()
    done = await q.wait(task.id, timeout=10)
    a.stop(), b.stop()
    await asyncio.gather(ra, rb)
    assert runs == ["a"] and done.output == "a" and done.attempt == 1
    assert b.stats["recovered"] == 0


async def test_a_slow_housekeeping_step_does_not_hold_back_the_heartbeat(clocked):
    """Worker a's sweep hangs (a loaded store answering its LIST and GETs in seconds)
    while it runs a long task: its heartbeats go on, so b, sweeping all along, never
    takes the task over. (Seen: a sweep of 16 s on a loaded machine let leases of 6 s
    expire, and their tasks ran twice.)"""
    q, clock = clocked
    task = await q.submit("long", None, timeout_seconds=600)
    runs = []
    release = asyncio.Event()
    a = Worker(q, concurrency=1, lease_ttl=1.0, poll_min=0.01, poll_max=0.05, sweep_interval=0.2)
    b = Worker(q, concurrency=1, lease_ttl=1.0, poll_min=0.01, poll_max=0.05, sweep_interval=0.2)
    swept_while_stuck = []

    async def stuck():  # the sweep's requests take as long as the task
        swept_while_stuck.append(clock.now())
        await release.wait()

    @a.handler("long")
    async def long_a(input, ctx):
        runs.append("a")
        a._sweep = stuck
        await release.wait()
        return "a"

    @b.handler("long")
    async def long_b(input, ctx):
        runs.append("b")
        return "b"

    ra = asyncio.create_task(a.run())
    while not runs:
        await asyncio.sleep(0.01)
    rb = asyncio.create_task(b.run())
    start = clock.now()
    while clock.now() - start < 10 or not swept_while_stuck:  # ten leases long
        await asyncio.sleep(0.01)
    release.set()
    done = await q.wait(task.id, timeout=10)
    a.stop(), b.stop()
    await asyncio.gather(ra, rb)
    assert swept_while_stuck and swept_while_stuck[0] < start + 1.0  # stuck before a lease passed
    assert runs == ["a"] and done.output == "a" and done.attempt == 1
    assert b.stats["recovered"] == 0 and a.stats["lost_lease"] == 0


async def test_without_heartbeats_the_task_is_taken_over_and_the_late_result_discarded(clocked):
    q, clock = clocked
    task = await q.submit("long", None, timeout_seconds=600)
    runs = []
    release = asyncio.Event()
    a = Worker(q, concurrency=1, lease_ttl=1.0, poll_min=0.01, poll_max=0.05, sweep_interval=0.2)
    b = Worker(q, concurrency=1, lease_ttl=1.0, poll_min=0.01, poll_max=0.05, sweep_interval=0.2)

    @a.handler("long")
    async def long_a(input, ctx):
        runs.append("a")
        async def frozen():  # a stalled process: its heartbeats stop
            return None
        a.book.write = frozen
        await release.wait()
        return "a"

    @b.handler("long")
    async def long_b(input, ctx):
        runs.append("b")
        return "b"

    ra = asyncio.create_task(a.run())
    while not runs:
        await asyncio.sleep(0.01)
    rb = asyncio.create_task(b.run())
    done = await q.wait(task.id, timeout=20)
    assert runs == ["a", "b"] and done.output == "b" and done.attempt == 2
    release.set()
    for _ in range(200):
        if a.stats["lost_lease"]:
            break
        await asyncio.sleep(0.01)
    a.stop(), b.stop()
    await asyncio.gather(ra, rb)
    assert a.stats["lost_lease"] == 1  # its late result was not written
    assert (await q.get(task.id)).output == "b"


async def test_orphan_marker_is_kept_while_young_and_dropped_when_old(clocked):
    q, clock = clocked
    ghost_id = keys.new_task_id()
    real = await q.submit("t", None)  # first: a store's first conditional write may cost a probe (S3)
    orphan = keys.ready(q.name, 128, clock.now(), ghost_id, "t")
    await q.storage.put(orphan, b"")  # a producer wrote its marker, then died
    worker = Worker(q, concurrency=2, poll_min=0.01, poll_max=0.05, sweep_interval=0.2, orphan_grace=5.0)
    ran = []
    worker.handler("t")(lambda input, ctx: ran.append(ctx.task.id))
    run = asyncio.create_task(worker.run())
    await q.wait(real.id, timeout=10)
    assert [e.key for e in await q.storage.list(orphan)] == [orphan]  # young: maybe still being written
    start = clock.now()
    while await q.storage.list(orphan):
        assert clock.now() - start < 30, "the old orphan marker was never dropped"
        await asyncio.sleep(0.01)
    worker.stop()
    await run
    assert ran == [real.id]


class FailingTaskWrites:
    """A storage wrapper whose task-object writes fail (a crash between submit's writes)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def put(self, key, data, **kw):
        if "/tasks/" in key:
            raise StorageUnavailable("injected", backend=self.name, key=key)
        return await self.inner.put(key, data, **kw)


async def test_a_producer_failing_between_its_writes_leaves_no_task_and_no_duplicate(storage_url):
    broken = await qo.connect(storage_url, queue="crash", wrap_storage=FailingTaskWrites)
    broken.store.backoff.attempts = 2
    with pytest.raises(StorageUnavailable):
        await broken.submit("t", None)
    assert [t async for t in broken.list()] == []
    assert len(await broken.storage.list(keys.ready_prefix("crash"))) == 1  # only the orphan marker
    await broken.close()


async def test_a_requeued_task_never_reuses_its_old_marker_key(storage_url):
    """With the clock standing still (an S3 offset refined downwards holds the clock),
    a retry at once must not land on the marker key that the claim's batched delete
    is about to remove."""
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="frozen", clock=clock)
    task = await q.submit("t", None)
    old_marker = task.marker_key(q.name, clock.now())
    got = await claim_as(q, LeaseBook(q.store, "w", clock, lease_ttl=10), task)
    now = clock.now()  # no time has passed
    stored, _ = await finish(q.store, got.task, got.etag, failed(RuntimeError("x"), 0.0, now), now)
    new_marker = stored.marker_key(q.name, now)
    assert stored.status == PENDING and stored.available_at > task.available_at
    assert new_marker != old_marker and new_marker.startswith(keys.ready_prefix(q.name))
    await q.close()
