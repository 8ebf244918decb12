"""Packs: submit_many's bulk path keeps every per-task guarantee at under one request
per task (docs/architecture.md §5k). Every test runs on each backend."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import multiprocessing
import os
import signal
from typing import Any

import pytest

import qo
from qo import keys
from qo.counting import CountingStorage
from qo.errors import InvalidInput
from qo.leases import recover_pack
from qo.worker import Worker

import procs

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)
CTX = multiprocessing.get_context("spawn")


async def keys_under(q: qo.Queue, prefix: str) -> list[str]:
    return [e.key for e in await q.storage.list(f"{q.name}/{prefix}")]


# -- submit and read ---------------------------------------------------------------------


async def test_a_bulk_submission_is_a_few_packs_and_every_task_reads_in_one_get(storage_url):
    q = await qo.connect(storage_url, queue="pk", wrap_storage=CountingStorage)
    items = [("resize", {"n": i}, {"max_retries": i % 3}) for i in range(300)] + [("mail", i) for i in range(5)]
    tasks = await q.submit_many(items)
    # 300 resize tasks: packs of 256 and 44; 5 mail tasks: one pack. A marker and a pack each.
    assert q.storage.counts() == {"GET": 1, "PUT": 3, "PUT_COND": 3}  # the GET: the queue's settings
    assert len(await keys_under(q, "packs/")) == 3 and await keys_under(q, "tasks/") == []
    assert len({keys.pack_of(t.id)[0] for t in tasks}) == 3
    assert [keys.pack_of(t.id)[1] for t in tasks[:3]] == [0, 1, 2] and keys.pack_of(tasks[256].id)[1] == 0
    q.storage.reset()
    got = await q.get(tasks[257].id)
    assert q.storage.counts() == {"GET": 1}
    assert (got.id, got.task_type, got.input, got.max_retries, got.status, got.attempt) == (
        tasks[257].id, "resize", {"n": 257}, 257 % 3, "pending", 0)
    assert (await q.get(tasks[-1].id)).input == 4
    with pytest.raises(qo.TaskNotFound):
        await q.get(keys.entry_id(keys.pack_of(tasks[-1].id)[0], 5))  # past the pack's end
    await q.close()


async def test_what_a_pack_cannot_keep_goes_the_single_path(storage_url):
    q = await qo.connect(storage_url, queue="pk")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    parent = await q.submit("p", None)
    tasks = await q.submit_many([
        ("a", 1), ("a", 2),
        ("a", 3, {"idempotency_key": "k"}), ("a", 4, {"schedule_at": later}),
        ("a", 5, {"depends_on": [parent.id]}), ("a", 6, {"rate_limit_key": "x"}),
        ("a", 7, {"expires_at": later}), ("a", "x" * 70_000),
        ("b", 1),  # a group of one
    ])
    assert [keys.pack_of(t.id) is not None for t in tasks] == [True, True] + [False] * 7
    singles = await q.submit_many([("a", i) for i in range(3)], bulk=False)
    assert all(keys.pack_of(t.id) is None for t in singles)
    with pytest.raises(InvalidInput) as err:
        await q.submit_many([("a", 1)], bulk="yes")
    assert err.value.field == "bulk"
    await q.close()


# -- run -----------------------------------------------------------------------------------


async def test_a_worker_drains_packs_under_one_request_per_task_end_to_end(storage_url):
    q = await qo.connect(storage_url, queue="pk", wrap_storage=CountingStorage)
    tasks = await q.submit_many([("noop", i) for i in range(600)])
    worker = Worker(q, concurrency=16, aging=False, **FAST)
    ran: collections.Counter[int] = collections.Counter()

    @worker.handler("noop")
    async def noop(x: int) -> int:
        ran[x] += 1
        return x * 2

    stats = await worker.run(until_idle=True)
    assert ran == {i: 1 for i in range(600)} and stats["completed"] == 600 and stats["claimed_packs"] == 3
    counts = q.storage.counts()
    total = sum(counts.values())
    assert total < 600, counts  # submit, claim, outcomes, marker deletes, record writes, LISTs
    done = [await q.get(t.id) for t in tasks[::97]]
    assert {(t.status, t.output, t.attempt) for t in done} == {("completed", t.input * 2, 1) for t in done} \
        or all(t.status == "completed" and t.output == t.input * 2 and t.attempt == 1 for t in done)
    assert await keys_under(q, "ready/") == []
    assert [t.id async for t in q.list(status="completed", limit=None)] == [t.id for t in tasks]
    await q.close()


async def test_a_retry_leaves_the_pack_and_a_dead_letter_stays_in_it(storage_url):
    q = await qo.connect(storage_url, queue="pk")
    tasks = await q.submit_many([("job", i, {"max_retries": 1}) for i in range(6)])
    worker = Worker(q, concurrency=4, aging=False, **FAST)
    attempts: collections.Counter[int] = collections.Counter()

    @worker.handler("job")
    async def job(x: int, ctx: Any) -> str:
        attempts[x] += 1
        if x == 1 and ctx.attempt == 1:
            raise qo.Retry(delay=0.05)  # runs again, as a task of its own
        if x == 2:
            raise ValueError("always")  # two attempts, then the dead letter
        return "ok"

    await worker.run(until_idle=True)
    assert attempts == {0: 1, 1: 2, 2: 2, 3: 1, 4: 1, 5: 1}
    retried, dead = await q.get(tasks[1].id), await q.get(tasks[2].id)
    assert (retried.status, retried.attempt, retried.output) == ("completed", 2, "ok")
    assert (dead.status, dead.attempt, dead.last_error["type"]) == ("failed", 2, "ValueError")
    # the retried task moved out to an object of its own; the dead letter did too (its
    # first attempt retried), and its ended/ index marker names it
    assert sorted(await keys_under(q, "tasks/")) == sorted(keys.task("pk", t.id) for t in (tasks[1], tasks[2]))
    assert [t.id async for t in q.list(status="failed")] == [tasks[2].id]
    await q.close()


async def test_dead_letters_cancel_and_retry_of_tasks_inside_a_pack(storage_url):
    q = await qo.connect(storage_url, queue="pk")
    tasks = await q.submit_many([("job", i, {"max_retries": 0}) for i in range(5)])
    await q.cancel(tasks[3].id)  # pending in a pending pack: ends now, never runs
    assert (await q.get(tasks[3].id)).status == "cancelled"
    worker = Worker(q, concurrency=2, aging=False, **FAST)
    ran: list[int] = []
    healed = False

    @worker.handler("job")
    async def job(x: int) -> int:
        ran.append(x)
        if x == 0 and not healed:
            raise ValueError("bad input")
        return x

    await worker.run(until_idle=True)
    assert sorted(ran) == [0, 1, 2, 4]
    failed = await q.get(tasks[0].id)
    assert failed.status == "failed" and keys.pack_of(failed.id) is not None
    assert await keys_under(q, "tasks/") == []  # no retry: still in the pack
    assert [t.id async for t in q.list(status="failed")] == [tasks[0].id]
    assert [t.id async for t in q.list(status="cancelled")] == [tasks[3].id]
    healed = True
    again = await q.retry(tasks[0].id)  # a dead letter retried: leaves the pack
    assert again.status == "pending" and await keys_under(q, "tasks/") == [keys.task("pk", tasks[0].id)]
    await worker.run(until_idle=True)
    assert (await q.get(tasks[0].id)).status == "completed" and ran.count(0) == 2
    assert [t.id async for t in q.list(status="failed")] == []
    await q.close()


async def test_priority_orders_packs_and_single_tasks_alike(storage_url):
    q = await qo.connect(storage_url, queue="pk")
    await q.submit("t", "single-100", priority=100)
    await q.submit_many([("t", f"pack-200-{i}", {"priority": 200}) for i in range(3)])
    await q.submit("t", "single-255", priority=255)
    await q.submit_many([("t", f"pack-50-{i}", {"priority": 50}) for i in range(3)])
    worker = Worker(q, concurrency=1, aging=False, **FAST)
    order: list[str] = []

    @worker.handler("t")
    async def t(x: str) -> None:
        order.append(x)

    await worker.run(until_idle=True)
    assert order == ["single-255", "pack-200-0", "pack-200-1", "pack-200-2", "single-100",
                     "pack-50-0", "pack-50-1", "pack-50-2"]
    await q.close()


async def test_a_running_task_of_a_pack_learns_its_cancel(storage_url):
    q = await qo.connect(storage_url, queue="pk")
    tasks = await q.submit_many([("slow", i) for i in range(2)])
    worker = Worker(q, concurrency=1, aging=False, heartbeat_interval=0.1, **FAST)
    started = asyncio.Event()

    @worker.handler("slow")
    async def slow(x: int, ctx: Any) -> str:
        if x == 0:
            started.set()
            for _ in range(500):
                ctx.raise_if_cancelled()
                await asyncio.sleep(0.01)
        return "done"

    run = asyncio.create_task(worker.run(until_idle=True))
    await asyncio.wait_for(started.wait(), 30)
    assert (await q.get(tasks[0].id)).status == "running"
    await q.cancel(tasks[1].id)  # not started yet: asked to cancel
    await q.cancel(tasks[0].id)  # running: its worker learns it with its next heartbeat
    await asyncio.wait_for(run, 30)
    first, second = await q.get(tasks[0].id), await q.get(tasks[1].id)
    assert first.status == "cancelled" and second.status == "cancelled"
    await q.close()


async def test_the_slots_at_a_start_bound_share_one_record_write(storage_url):
    """A held pack's start bound is raised by one record write for all the slots that wait
    at it (a write each cost 0.1 requests a task in the bulk benchmark and halved its
    drain): a pack of 256 on 32 slots is started with a few writes, not one per slot."""
    q = await qo.connect(storage_url, queue="bounds")
    await q.submit_many([("t", i) for i in range(256)])
    w = Worker(q, concurrency=32, **FAST)
    w.handler("t")(lambda input: input)
    writes = 0
    real = w.book.write

    async def counted() -> None:
        nonlocal writes
        writes += 1
        await real()

    w.book.write = counted
    await asyncio.wait_for(w.run(until_idle=True), 120)
    assert w.stats["completed"] == 256
    assert writes <= 12, writes  # the announce, ~4 raises (1, 33, 66, 132 -> all), heartbeats, the end
    await q.close()


async def test_a_cancel_of_a_task_of_a_held_pack_not_started_says_cancelled_and_it_never_starts(storage_url):
    """Issue 26 item 2: the cancel of a task its pack's holder has not started returned
    ``running``. The holder stores how far into the pack it may start before its record
    is stored again; a cancel landing on a record whose bound is at or below the entry
    is sure the entry will not start (that write learns it first): it says
    ``cancelled``, in the API and in ``qo cancel``. A task that may have started still
    says ``running`` (asked to stop)."""
    from click.testing import CliRunner

    from qo.cli import cli

    q = await qo.connect(storage_url, queue="pk")
    tasks = await q.submit_many([("slow", i) for i in range(5)])
    assert len({keys.pack_of(t.id)[0] for t in tasks}) == 1
    worker = Worker(q, concurrency=1, aging=False, heartbeat_interval=0.1, **FAST)
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[int] = []

    @worker.handler("slow")
    async def slow(x: int) -> str:
        ran.append(x)
        if x == 0:
            started.set()
            await asyncio.wait_for(release.wait(), 30)
        return "done"

    run = asyncio.create_task(worker.run(until_idle=True))
    try:
        await asyncio.wait_for(started.wait(), 30)
        said = await q.cancel(tasks[2].id)  # held, not started
        assert (said.id, said.status) == (tasks[2].id, "cancelled")
        out = await asyncio.to_thread(CliRunner().invoke, cli, ["cancel", tasks[4].id, "--url", storage_url,
                                                                "--queue", "pk"])
        assert out.exit_code == 0 and out.stdout.strip() == "cancelled", out.output
        first = await q.cancel(tasks[0].id)  # running: asked to stop, its attempt may complete
        assert first.status == "running" and first.cancel_requested
    finally:
        release.set()
    await asyncio.wait_for(run, 30)
    assert ran == [0, 1, 3]  # the cancelled ones never started
    assert [(await q.get(t.id)).status for t in tasks] == ["completed", "completed", "cancelled", "completed",
                                                           "cancelled"]
    await q.close()


async def test_cancels_racing_a_holder_in_another_process_say_cancelled_only_for_tasks_that_never_run(
        storage_url, tmp_path):
    """The same against a holder in another process, its record written every 0.1 s and
    its start bound raised every few entries: many cancels race the raises, and none
    that says ``cancelled`` names a task that started."""
    import random

    q = await qo.connect(storage_url, queue="pkcancel")
    tasks = await q.submit_many([("count", i) for i in range(200)])
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    loop = asyncio.get_running_loop()
    said: dict[str, str] = {}
    with CTX.Pool(1) as pool:
        result = pool.apply_async(procs.run_start_logging_worker, (storage_url, "pkcancel", str(log_dir), 2, 0.05, 0.1))
        deadline = loop.time() + 120
        while not any(f.stat().st_size for f in log_dir.iterdir()):
            assert loop.time() < deadline and not result.ready()
            await asyncio.sleep(0.01)
        order = list(range(1, 200))
        random.Random(26).shuffle(order)
        for i in order[:100]:
            try:
                said[tasks[i].id] = (await q.cancel(tasks[i].id)).status
            except qo.TaskStateError:  # ended already
                pass
        stats = await loop.run_in_executor(None, lambda: result.get(timeout=240))
    ran = {line for f in log_dir.iterdir() for line in f.read_text().split()}
    cancelled = {t for t, status in said.items() if status == "cancelled"}
    assert cancelled and set(said.values()) <= {"cancelled", "running"}, said
    print(f"said cancelled: {len(cancelled)}, running: {len(said) - len(cancelled)}, ran: {len(ran)}")
    assert not cancelled & ran  # the bug would be a task said cancelled that ran anyway
    final = {t.id: (await q.get(t.id)).status for t in tasks}
    assert all(final[t] == "cancelled" for t in cancelled)
    assert {t for t, s in final.items() if s == "completed"} == ran  # and every task not started: cancelled
    assert {t for t, s in final.items() if s == "cancelled"} == set(final) - ran and stats.get("errors", 0) == 0
    await q.close()


# -- leases ---------------------------------------------------------------------------------


async def test_a_pack_recovered_under_its_holder_discards_the_holders_outcomes(storage_url):
    """The holder's lease is lost (recovery took the pack: its heartbeat was presumed
    dead); its later flush is refused and none of its outcomes lands."""
    q = await qo.connect(storage_url, queue="pk")
    tasks = await q.submit_many([("job", i) for i in range(3)])
    worker = Worker(q, concurrency=1, aging=False, **FAST)
    gate = asyncio.Event()
    pack_id = keys.pack_of(tasks[0].id)[0]

    @worker.handler("job")
    async def job(x: int) -> int:
        if x == 0 and not gate.is_set():
            pack, _ = await q.store.packs.load(pack_id)
            assert pack.status == "running"
            recovered = await recover_pack(q.store, q.clock, pack_id, pack.lease["worker_id"],
                                           pack.lease["lease_id"])
            assert sorted(recovered) == sorted(t.id for t in tasks)
            gate.set()
        return x

    stats = await worker.run(until_idle=True)
    assert gate.is_set() and stats["lost_lease"] >= 1
    # recovered: back to pending with the attempt counted, then run again (now or later)
    for t in tasks:
        got = await q.get(t.id)
        assert got.status == "completed" and got.attempt == 2, got
    await q.close()


async def test_four_worker_processes_run_each_task_of_2000_in_packs_exactly_once(storage_url, tmp_path):
    q = await qo.connect(storage_url, queue="pkrace")
    tasks = await q.submit_many([("count", i) for i in range(2000)])  # 8 packs
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    loop = asyncio.get_running_loop()
    with CTX.Pool(4) as pool:
        results = [pool.apply_async(procs.run_counting_worker, (storage_url, "pkrace", str(log_dir), 8, 0.02))
                   for _ in range(4)]
        stats = await loop.run_in_executor(None, lambda: [r.get(timeout=240) for r in results])
    runs: collections.Counter[str] = collections.Counter()
    for f in log_dir.iterdir():
        runs.update(f.read_text().split())
    assert set(runs) == {t.id for t in tasks}
    assert max(runs.values()) == 1, [t for t, n in runs.items() if n > 1]
    assert sum(s.get("completed", 0) for s in stats) == 2000
    assert sum(1 for s in stats if s.get("claimed_packs")) >= 2  # the packs were shared
    assert collections.Counter([t.status async for t in q.list(limit=None)]) == {"completed": 2000}
    assert await q.storage.list(keys.ready_prefix("pkrace")) == []
    await q.close()


async def test_a_sigkilled_holder_s_pack_finishes_elsewhere_without_rerunning_what_was_stored(
        storage_url, tmp_path):
    q = await qo.connect(storage_url, queue="pkkill")
    tasks = await q.submit_many([("step", i, {"max_retries": 3}) for i in range(40)])
    log = tmp_path / "ran.log"
    victim = CTX.Process(target=procs.run_pack_victim, args=(storage_url, "pkkill", str(log), 0.5))
    victim.start()
    try:
        procs.wait_for_lines(str(log), 24)  # 20 ended, 4 running (concurrency 4)
        pack_id = keys.pack_of(tasks[0].id)[0]
        for _ in range(300):  # the holder's timed flush (0.5 s) stores what ended
            pack, _ = await q.store.packs.load(pack_id)
            if sum(pack.status_of(i) == "completed" for i in range(40)) == 20:
                break
            await asyncio.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
    finally:
        if victim.is_alive():
            victim.kill()
    before = [await q.get(t.id) for t in tasks]
    stored = {t.id for t in before if t.status == "completed"}
    assert stored and any(t.status == "running" for t in before)
    rescuer = Worker(q, concurrency=8, aging=False, lease_ttl=0.5, **FAST)
    rescued: list[str] = []

    @rescuer.handler("step")
    async def step(x: int, ctx: Any) -> int:
        rescued.append(ctx.task.id)
        return x

    await asyncio.wait_for(rescuer.run(until_idle=True), 60)
    after = {t.id: await q.get(t.id) for t in tasks}
    assert all(t.status == "completed" for t in after.values())
    assert not stored & set(rescued)  # what the dead holder stored is never run again
    assert {t.id for t in before if t.status != "completed"} == set(rescued)
    assert all(after[i].attempt == 2 for i in rescued)  # the abandoned attempt counted
    await q.close()


# -- inspection and retention -----------------------------------------------------------------


async def test_stats_count_packed_tasks_and_retention_deletes_a_pack_whole(storage_url):
    import time

    from qo.clock import FakeClock
    from qo.retention import apply_retention

    q = await qo.connect(storage_url, queue="pk")
    await q.settings.set(retention_completed="2d", retention_failed="5d")
    ok = await q.submit_many([("ok", i) for i in range(5)])
    mixed = await q.submit_many([("mix", i, {"max_retries": 0}) for i in range(4)])
    assert (await q.stats())["counts"]["pending"] == 9  # two pack markers, nine tasks
    worker = Worker(q, concurrency=4, aging=False, **FAST)

    @worker.handler("ok")
    async def ok_(x: int) -> int:
        return x

    @worker.handler("mix")
    async def mix(x: int) -> int:
        if x == 0:
            raise qo.Fail("no")
        return x

    await worker.run(until_idle=True)
    assert [t.id async for t in q.list(status="failed")] == [mixed[0].id]
    ok_pack, mixed_pack = (keys.pack("pk", keys.pack_of(t[0].id)[0]) for t in (ok, mixed))

    async def later(days: float) -> qo.Queue:
        return await qo.connect(storage_url, queue="pk", clock=FakeClock(time.time() + days * 86400))

    at3 = await later(3)
    assert await apply_retention(at3) == {"packed": 5}  # the mixed pack keeps its dead letter 5 days
    assert await keys_under(q, "packs/") == [mixed_pack]
    with pytest.raises(qo.TaskNotFound):
        await q.get(ok[0].id)
    at6 = await later(6)
    assert await apply_retention(at6) == {"packed": 4}
    assert await keys_under(q, "packs/") == [] and await keys_under(q, "ended/") == []
    await q.submit_many([("ok", i) for i in range(3)])
    await worker.run(until_idle=True)
    at8 = await later(8)
    assert await at8.purge("failed", dt.timedelta(days=1)) == 0  # a pack of completed tasks
    assert await at8.purge("completed", dt.timedelta(days=1)) == 3
    assert await keys_under(q, "packs/") == []
    for x in (q, at3, at6, at8):
        await x.close()


async def test_pages_show_the_tasks_of_packs_reading_each_pack_once(storage_url):
    q = await qo.connect(storage_url, queue="pk")
    single = await q.submit("t", "alone")
    packed = await q.submit_many([("t", i) for i in range(30)])
    newest_first = [t.id for t in reversed([single, *packed])]
    for status in (None, "pending"):
        page = await q.page(status=status, limit=20)
        assert [t.id for t in page.tasks] == newest_first[:20]
        assert page.reads == 1 and page.next_cursor is not None  # the pack, read once
        rest = await q.page(status=status, after=page.next_cursor, limit=20)
        assert [t.id for t in rest.tasks] == newest_first[20:] and rest.next_cursor is None
    assert [t.id async for t in q.list(status="pending", limit=None)] == [single.id, *(t.id for t in packed)]
    await q.close()


async def test_a_bad_pack_or_a_bad_task_in_a_pack_costs_only_itself(storage_url):
    """The bucket may hold anything: a pack cut short, or one whose task is unusable,
    is skipped and reported; every other task runs; `qo doctor --scan` names both."""
    import json

    from click.testing import CliRunner

    from qo.cli import cli

    q = await qo.connect(storage_url, queue="pk")
    good = await q.submit_many([("t", i) for i in range(5)])
    cut = await q.submit_many([("t", 10 + i) for i in range(3)])
    odd = await q.submit_many([("t", 20 + i) for i in range(3)])
    cut_key, odd_key = (keys.pack("pk", keys.pack_of(t[0].id)[0]) for t in (cut, odd))
    data = (await q.storage.get(cut_key)).data
    await q.storage.put(cut_key, data[: len(data) // 2])
    stored = json.loads((await q.storage.get(odd_key)).data)
    stored["entries"][1]["priority"] = "high"
    await q.storage.put(odd_key, json.dumps(stored).encode())
    worker = Worker(q, concurrency=4, aging=False, **FAST)
    ran: list[int] = []

    @worker.handler("t")
    async def t(x: int) -> None:
        ran.append(x)

    await asyncio.wait_for(worker.run(until_idle=True), 30)
    assert sorted(ran) == [0, 1, 2, 3, 4, 20, 22]
    assert [(await q.get(t.id)).status for t in good] == ["completed"] * 5
    with pytest.raises(qo.CorruptObject):
        await q.get(cut[0].id)
    with pytest.raises(qo.CorruptObject):
        await q.get(odd[1].id)
    assert (await q.get(odd[2].id)).status == "completed"
    assert sorted([t.input async for t in q.list(limit=None)]) == [0, 1, 2, 3, 4, 20, 22]
    out = await asyncio.to_thread(CliRunner().invoke, cli, ["doctor", "--scan", "--url", storage_url, "--queue", "pk"])
    assert out.exit_code == 1, out.output
    assert {line.split(":")[0] for line in out.stdout.splitlines()} == {cut_key, odd_key}
    await q.close()


async def test_a_pack_whose_holders_died_twice_splits_into_tasks_of_their_own(storage_url):
    """A task that kills its worker takes its pack's unfinished tasks through one
    recovery with it; at the second, they leave the pack and go on alone."""
    q = await qo.connect(storage_url, queue="pk")
    tasks = await q.submit_many([("t", i, {"max_retries": 5}) for i in range(4)])
    pack_id = keys.pack_of(tasks[0].id)[0]
    worker = Worker(q, concurrency=2, aging=False, **FAST)

    async def claim_and_die(lease_id: str) -> None:
        [marker] = [m for m in (keys.parse_marker(e.key) for e in await q.storage.list("pk/ready/")) if m]
        run = await worker.packs.claim(marker, lease_id)
        assert run.lease_id == lease_id
        await q.storage.delete(marker.key)
        assert sorted(await recover_pack(q.store, q.clock, pack_id, worker.worker_id, lease_id)) == \
            sorted(t.id for t in tasks)

    await claim_and_die("first")
    assert await keys_under(q, "tasks/") == []  # once: back to pending inside the pack
    assert [(await q.get(t.id)).attempt for t in tasks] == [1] * 4
    await claim_and_die("second")
    assert sorted(await keys_under(q, "tasks/")) == sorted(keys.task("pk", t.id) for t in tasks)
    pack, _ = await q.store.packs.load(pack_id)
    assert pack.status == "done" and [(await q.get(t.id)).status for t in tasks] == ["pending"] * 4
    ran: list[int] = []
    worker.handler("t")(lambda x: ran.append(x))
    await worker.run(until_idle=True)
    assert sorted(ran) == [0, 1, 2, 3] and [(await q.get(t.id)).attempt for t in tasks] == [3] * 4
    await q.close()


async def test_recovery_skips_a_bad_task_and_recovers_the_rest_of_its_pack(storage_url):
    import json

    q = await qo.connect(storage_url, queue="pk")
    tasks = await q.submit_many([("t", i) for i in range(3)])
    pack_id = keys.pack_of(tasks[0].id)[0]
    worker = Worker(q, concurrency=1, aging=False, **FAST)
    [marker] = [m for m in (keys.parse_marker(e.key) for e in await q.storage.list("pk/ready/")) if m]
    await worker.packs.claim(marker, "L")
    stored = json.loads((await q.storage.get(keys.pack("pk", pack_id))).data)
    stored["entries"][1]["attempt"] = "one"  # unusable: that task alone is lost to recovery
    await q.storage.put(keys.pack("pk", pack_id), json.dumps(stored).encode())
    recovered = await recover_pack(q.store, q.clock, pack_id, worker.worker_id, "L")
    assert sorted(recovered) == sorted([tasks[0].id, tasks[2].id]) and q.store.bad.count == 1
    assert [(await q.get(t.id)).status for t in (tasks[0], tasks[2])] == ["pending", "pending"]
    await q.close()


async def test_a_pack_outside_the_format_s_bounds_is_corrupt_and_costs_only_itself(storage_url, caplog, monkeypatch):
    """Issue 26 item 3: a hand-written pack of 4,096 entries (16x the limit) was claimed
    and every task in it ran. A pack over any bound of the format (entries, the count
    its id states, statuses, its size) is not run, is reported once, and the worker
    goes on with other work."""
    import json
    import logging

    from qo import packs

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(packs, "PACK_READ_BYTES", 200_000, raising=False)  # in place of 16 MiB: a bloated pack
    q = await qo.connect(storage_url, queue="pk")
    good = await q.submit_many([("t", f"good-{i}") for i in range(5)])
    model = json.loads((await q.storage.get(keys.pack("pk", keys.pack_of(good[0].id)[0]))).data)

    def variant(name: str, size: int, count: int, **change: Any) -> dict[str, Any]:
        return {**model, "id": keys.new_pack_id(size), "rev": "",
                "entries": [{"input": f"{name}-{i}", "rev": ""} for i in range(count)], **change}

    bad = [variant("huge", 4096, 4096), variant("over", 300, 300), variant("miscount", 3, 5),
           variant("pad", 3, 3, pad="x" * 300_000),
           variant("tstatus", 3, 3, template={**model["template"], "status": 7})]
    odd = variant("status", 3, 3)
    odd["entries"][1]["status"] = ["pending"]  # not even hashable
    bad.append(odd)
    for d in bad:
        await q.storage.put(keys.pack("pk", d["id"]), json.dumps(d).encode())
        await q.storage.put(keys.ready("pk", d["priority"], d["available_at"], d["id"], d["task_type"]), b"")
    worker = Worker(q, concurrency=4, aging=False, **FAST)
    ran: list[str] = []

    @worker.handler("t")
    async def t(x: str) -> None:
        ran.append(x)

    await asyncio.wait_for(worker.run(until_idle=True), 60)
    assert sorted(ran) == [f"good-{i}" for i in range(5)]  # none of a bad pack's tasks ran
    assert [(await q.get(t.id)).status for t in good] == ["completed"] * 5
    assert worker.stats["errors"] == 0 and worker.stats["bad_objects"] >= len(bad)
    for d in bad:
        key = keys.pack("pk", d["id"])
        assert sum(1 for r in caplog.records if r.name == "qo.bad_objects" and key in r.getMessage()) == 1, key
        with pytest.raises(qo.CorruptObject):
            await q.get(keys.entry_id(d["id"], 0))
    await q.close()
