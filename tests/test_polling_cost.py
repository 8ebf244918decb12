"""Cost follows the work (issue 16): a busy worker lists delayed/ no more often than an
idle one, and a delayed task the worker wrote itself is still promoted on time."""

from __future__ import annotations

import asyncio
import collections
import time

import qo
from qo.worker import Worker


class ListsByPrefix:
    """Counts LIST calls by the folder they list."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.lists: collections.Counter[str] = collections.Counter()
        if hasattr(inner, "delete_many"):
            self.delete_many = inner.delete_many

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def list(self, prefix, start_after=None, limit=1000):
        self.lists[prefix.split("/")[1]] += 1
        return await self.inner.list(prefix, start_after=start_after, limit=limit)


async def test_a_busy_worker_lists_delayed_no_more_often_than_an_idle_one(storage_url):
    q = await qo.connect(storage_url, queue="q", wrap_storage=ListsByPrefix)
    for i in range(4):
        await q.submit("slow", i)
    w = Worker(q, concurrency=4, poll_min=0.05, poll_max=1.0, sweep_interval=5.0)
    started = asyncio.Event()
    release = asyncio.Event()

    @w.handler("slow")
    async def slow(input):
        started.set()
        await release.wait()

    run = asyncio.create_task(w.run())
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.3)  # every slot busy from here on
    q.storage.lists.clear()
    await asyncio.sleep(2.0)
    busy = q.storage.lists["delayed"]
    release.set()
    w.stop()
    await asyncio.wait_for(run, 10)
    # backing off 0.05 -> 1 s as an idle worker does: at most ~5 in 2 s (it was 40 at 50 ms)
    assert busy <= 6, q.storage.lists
    await q.close()


async def test_a_retry_the_worker_wrote_itself_is_promoted_on_time_though_polling_backed_off(storage_url):
    q = await qo.connect(storage_url, queue="q")
    task = await q.submit("flaky", None)
    w = Worker(q, concurrency=2, poll_min=0.05, poll_max=5.0, sweep_interval=5.0)
    starts: list[float] = []

    @w.handler("flaky")
    async def flaky(input, ctx):
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            await asyncio.sleep(1.5)  # promotion backs off meanwhile (nothing delayed)
            raise qo.Retry(0.5)
        return "ok"

    await asyncio.wait_for(w.run(until_idle=True), 30)
    assert (await q.get(task.id)).status == "completed"
    assert 0.45 <= starts[1] - starts[0] - 1.5 <= 1.5, starts  # not up to poll_max (5 s) late
    await q.close()


async def _ready_lists(storage_url: str, seconds_per_task: float, tasks: int = 128, **settings) -> int:
    """LISTs of the ready index a lone worker (4 slots: 32 markers a listing) makes to
    drain ``tasks``, its handlers taking ``seconds_per_task`` of a fake clock each."""
    from qo.clock import FakeClock

    clock = FakeClock()
    q = await qo.connect(storage_url, queue="q", clock=clock, wrap_storage=ListsByPrefix)
    try:
        await q.submit_many([("t", i) for i in range(tasks)], bulk=False)
        w = Worker(q, concurrency=4, poll_min=0.01, poll_max=0.05, **settings)
        done = []

        @w.handler("t")
        async def t(value):
            clock.advance(seconds_per_task)  # the only time that passes: the rate is exact
            done.append(value)
            if len(done) == tasks:
                w.stop()

        before = q.storage.lists["ready"]
        await asyncio.wait_for(w.run(), 60)
        assert sorted(done) == list(range(tasks))
        return q.storage.lists["ready"] - before
    finally:
        await q.close()


async def test_a_fast_worker_lists_a_tenth_of_a_second_of_work_at_once(storage_url):
    """A listing is ``max(4 x concurrency, 32)`` markers, or what the worker has lately
    taken in 0.1 s when that is more: LISTs (and the record writes announcing their
    candidates) follow the work, while a new urgent task waits behind at most about
    0.1 s of listed work (or the usual 32). ``list_limit`` set by hand is kept."""
    fast = await _ready_lists(storage_url, 0.0002)  # 5,000 tasks/s: 500 a listing (of 128 tasks)
    assert fast <= 3, fast  # 32 (the rate is measured on it), the other 96, and a last look
    if "://" in storage_url:  # s3, azure
        return  # the rest is the feed's arithmetic, the same on every backend
    assert await _ready_lists(storage_url, 0.01) >= 128 // 32  # 100/s: 10 a listing, so the usual 32
    assert await _ready_lists(storage_url, 0.0002, list_limit=32) >= 128 // 32
