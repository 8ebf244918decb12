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
