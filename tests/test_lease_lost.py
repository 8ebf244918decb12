"""A worker whose lease recovery took over learns it while the handler runs
(``ctx.lease_lost``), its outcome's CAS is refused, and it says so once per task."""

from __future__ import annotations

import asyncio
import logging
import time

import qo
from clocks import ticking_queue
from qo import keys
from qo.errors import PreconditionFailed
from qo.leases import parse_record, recover_record
from qo.store import Backoff
from qo.testing.faults import FaultyStorage
from qo.worker import Worker

FAST = dict(concurrency=1, lease_ttl=3.0, poll_min=0.01, poll_max=0.1, sweep_interval=0.3, shutdown_timeout=5.0)


async def until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def take_over(q: qo.Queue, worker_id: str) -> list[str]:
    """What a recovering worker's sweep does to a record it judged stale: requeue the
    tasks it names that still run under it, then delete the version it judged."""
    key = keys.worker(q.name, worker_id)
    blob = await q.storage.get(key)
    recovered = await recover_record(q.store, q.clock, parse_record(blob.data, key))
    for _ in range(10):  # a write of the worker that was under way may land in between
        try:
            await q.storage.delete(key, if_match=blob.etag)
            return recovered
        except PreconditionFailed:
            blob = await q.storage.get(key)
    raise AssertionError("the record kept changing")


def lost_lines(caplog, task_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "qo.worker.tasks" and getattr(r, "event", "") == "lease_lost"
            and r.task_id == task_id]


async def completed_by_b(q: qo.Queue, task_id: str):
    async def done() -> bool:
        return (await q.get(task_id)).status == "completed"
    await until(done)


async def test_the_first_holder_learns_its_lease_was_lost_and_its_outcome_is_refused(storage_url, caplog):
    caplog.set_level(logging.INFO, logger="qo.worker")
    async with ticking_queue(storage_url, "lost", speed=10.0) as (q, clock):
        task = await q.submit("long", None, timeout_seconds=600)
        seen: dict[str, bool] = {}
        a, b = Worker(q, **FAST), Worker(q, **FAST)

        @a.handler("long")
        async def first(value, ctx):
            seen["before"] = ctx.lease_lost
            seen["running"] = True

            async def told() -> bool:
                return ctx.lease_lost
            await until(told)  # a long handler polling it, to stop early
            seen["after"] = ctx.lease_lost
            await completed_by_b(q, task.id)  # the second run's outcome is stored first
            return "first"

        @b.handler("long")
        async def second(value, ctx):
            assert not ctx.lease_lost
            return "second"

        ra = asyncio.create_task(a.run())

        async def running() -> bool:
            return seen.get("running", False)
        await until(running)
        real_write = a.book.write

        async def stalled() -> None:  # as if a had stalled: no write of its record meanwhile
            return None
        a.book.write = stalled
        assert await take_over(q, a.worker_id) == [task.id]  # as a sweep of a stale record
        a.book.write = real_write
        rb = asyncio.create_task(b.run())

        async def settled() -> bool:
            return a.stats["lost_lease"] == 1
        await until(settled)
        a.stop(), b.stop()
        await asyncio.gather(ra, rb)
        final = await q.get(task.id)
    assert seen == {"before": False, "running": True, "after": True}
    assert final.status == "completed" and final.output == "second" and final.attempt == 2
    assert final.worker_id == b.worker_id and b.stats["completed"] == 1 and a.stats["completed"] == 0
    [line] = lost_lines(caplog, task.id)  # once per task: learned early, not said again at the refusal
    assert line.levelname == "WARNING" and task.id in line.getMessage()
    assert "lease lost" in line.getMessage() and "may run again elsewhere" in line.getMessage()


async def test_a_lease_lost_in_a_storage_outage_is_learned_when_the_store_answers(storage_url, caplog):
    """The issue's case: the first holder cannot reach the store for longer than its
    lease; another worker recovers the task and runs it; when the store answers again,
    the first holder's heartbeat finds its record taken over, its handler sees
    ``ctx.lease_lost``, and its late outcome is refused."""
    caplog.set_level(logging.INFO, logger="qo.worker")
    faults: list[FaultyStorage] = []

    def faulty(storage):
        faults.append(FaultyStorage(storage, error_rate=1.0))
        faults[-1].enabled = False
        return faults[-1]

    async with ticking_queue(storage_url, "outage", speed=10.0) as (q, clock):
        qa = await qo.connect(storage_url, queue="outage", clock=clock, wrap_storage=faulty)
        qa.store.backoff = Backoff(attempts=2, base=0.01, cap=0.02)  # the outage shows at once
        try:
            task = await q.submit("long", None, timeout_seconds=600)
            seen: dict[str, object] = {}
            a, b = Worker(qa, **FAST), Worker(q, **FAST)

            @a.handler("long")
            async def first(value, ctx):
                faults[0].enabled = True  # the first holder's store stops answering
                seen["started"] = clock.now()

                async def told() -> bool:
                    return ctx.lease_lost
                await until(told)
                seen["learned"] = ctx.lease_lost
                return "first"

            @b.handler("long")
            async def second(value, ctx):
                seen["second"] = clock.now()
                faults[0].enabled = False  # ... and answers again once the task was taken over
                return "second"

            ra = asyncio.create_task(a.run())

            async def started() -> bool:
                return "started" in seen
            await until(started)
            rb = asyncio.create_task(b.run())

            async def settled() -> bool:
                return a.stats["lost_lease"] == 1
            await until(settled)
            a.stop(), b.stop()
            await asyncio.gather(ra, rb)
            final = await q.get(task.id)
        finally:
            await qa.close()
    assert seen["learned"] is True and seen["second"] - seen["started"] > FAST["lease_ttl"]
    assert final.status == "completed" and final.output == "second" and final.attempt == 2
    assert b.stats["recovered"] == 1 and a.stats["completed"] == 0
    [line] = lost_lines(caplog, task.id)
    assert line.levelname == "WARNING" and "may run again elsewhere" in line.getMessage()


async def test_a_worker_that_keeps_its_lease_is_not_told_otherwise(storage_url):
    """A heartbeat that lands late (the lease had run out, nobody took it over) makes the
    worker look at its tasks: still running under its lease, the handler is not told."""
    async with ticking_queue(storage_url, "kept", speed=10.0) as (q, clock):
        task = await q.submit("long", None, timeout_seconds=600)
        seen: dict[str, object] = {}
        w = Worker(q, **FAST)

        @w.handler("long")
        async def long(value, ctx):
            lapses = w.book.lapses
            real_write = w.book.write

            async def silent():  # a stalled process: no heartbeat lands for two leases
                return None
            w.book.write = silent
            start = clock.now()
            while clock.now() - start < 2 * FAST["lease_ttl"]:
                await asyncio.sleep(0.01)
            w.book.write = real_write

            async def noticed() -> bool:
                return w.book.lapses > lapses and w._lapses_checked == w.book.lapses
            await until(noticed)  # the late heartbeat landed and the tasks were looked at
            seen["lost"] = ctx.lease_lost
            return "kept"

        done_task = asyncio.create_task(w.run(until_idle=True))
        done = await q.wait(task.id, timeout=30)
        await asyncio.wait_for(done_task, 30)
    assert seen == {"lost": False}
    assert done.status == "completed" and done.output == "kept" and done.attempt == 1
    assert w.stats["lost_lease"] == 0


async def test_a_takeover_whose_record_delete_lost_to_the_late_heartbeat_is_learned_too(storage_url, caplog):
    """Recovery requeued the task, then its conditional delete of the record lost to the
    worker's late heartbeat (or the store ignores If-Match on DELETE): the record lives,
    no eviction is seen; the heartbeat landed after the lease ran out, so the worker
    looks, and learns it."""
    caplog.set_level(logging.INFO, logger="qo.worker")
    async with ticking_queue(storage_url, "late", speed=10.0) as (q, clock):
        task = await q.submit("long", None, timeout_seconds=600)
        seen: dict[str, bool] = {}
        a = Worker(q, **FAST)

        @a.handler("long")
        async def first(value, ctx):
            if ctx.attempt > 1:  # run again (here by the same worker, once requeued)
                return "second"
            real_write = a.book.write

            async def stalled() -> None:
                return None
            a.book.write = stalled  # no heartbeat lands for longer than the lease
            start = clock.now()
            while clock.now() - start < 1.5 * FAST["lease_ttl"]:
                await asyncio.sleep(0.01)
            key = keys.worker(q.name, a.worker_id)
            record = parse_record((await q.storage.get(key)).data, key)
            seen["recovered"] = await recover_record(q.store, q.clock, record) == [task.id]  # no delete
            a.book.write = real_write

            async def told() -> bool:
                return ctx.lease_lost
            await until(told)
            seen["told"] = True
            return "first"

        running = asyncio.create_task(a.run())

        back = await q.wait(task.id, timeout=30)

        async def settled() -> bool:
            return a.stats["lost_lease"] == 1
        await until(settled)
        a.stop()
        await running
        back = await q.get(task.id)
    assert seen == {"recovered": True, "told": True}
    assert a.book.evictions == 0  # the record was never taken: only the late write said to look
    assert back.status == "completed" and back.output == "second" and back.attempt == 2  # "first" refused
    [line] = lost_lines(caplog, task.id)
    assert "may run again elsewhere" in line.getMessage()
