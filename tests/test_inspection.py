"""Inspection that costs what it returns (issue 16): listings by status read their
index, stats read no task, and both cost the same on a queue of any history."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
from click.testing import CliRunner

import qo
from qo import keys
from qo.cli import cli
from qo.counting import CountingStorage
from qo.leases import LeaseBook, sweep
from qo.transitions import claim, failed, finish
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5)


async def counted(url: str, name: str = "q") -> qo.Queue:
    return await qo.connect(url, queue=name, wrap_storage=CountingStorage)


async def build(q: qo.Queue, completed: int, failures: int = 3, cancels: int = 2) -> dict[str, list]:
    """``completed`` done tasks, ``failures`` dead letters, ``cancels`` cancelled ones."""
    ok = await q.submit_many([("ok", i) for i in range(completed)])
    bad = [await q.submit("bad", i, max_retries=0) for i in range(failures)]
    w = Worker(q, concurrency=8, **FAST)
    w.handler("ok")(lambda input: input)

    @w.handler("bad")
    def bad_handler(input):
        raise ValueError(f"boom {input}")

    await asyncio.wait_for(w.run(until_idle=True), 60)
    gone = [await q.submit("later", i) for i in range(cancels)]
    for t in gone:
        await q.cancel(t.id)
    return {"ok": ok, "bad": bad, "gone": gone}


async def requests_of(q: qo.Queue, coro) -> tuple[object, int, dict]:
    q.storage.reset()
    result = await coro
    return result, q.storage.total, q.storage.counts()


async def test_listing_failures_costs_the_same_on_a_long_history(storage_url):
    small, large = await counted(storage_url, "small"), await counted(storage_url, "large")
    made_small, made_large = await build(small, 10), await build(large, 120)
    costs = []
    for q, made in ((small, made_small), (large, made_large)):
        rows, cost, by_op = await requests_of(q, _collect(q.list(status="failed")))
        assert sorted(t.id for t in rows) == sorted(t.id for t in made["bad"])
        assert all(t.status == "failed" and "boom" in t.last_error["message"] for t in rows)
        costs.append(cost)
        rows, _, _ = await requests_of(q, _collect(q.list(status="cancelled")))
        assert sorted(t.id for t in rows) == sorted(t.id for t in made["gone"])
    assert costs[0] == costs[1] == 1 + 3, costs  # one LIST of ended/failed/ and one GET per row
    await small.close()
    await large.close()


async def _collect(agen) -> list:
    return [x async for x in agen]


async def test_failed_newest_first_since_and_oldest_first(storage_url):
    q = await qo.connect(storage_url, queue="q")
    made = await build(q, 0, failures=4, cancels=0)
    ended = {t.id: keys.ms((await q.get(t.id)).finished_at) for t in made["bad"]}
    # the index's order: newest first, ties (the same millisecond) by id
    by_end = sorted(ended, key=lambda i: (-ended[i], i))[::-1]
    assert [t.id async for t in q.list(status="failed")] == by_end
    assert [t.id async for t in q.list(status="failed", newest_first=True)] == by_end[::-1]
    assert [t.id async for t in q.list(status="failed", newest_first=True, limit=2)] == by_end[::-1][:2]
    since_third = [i for i in by_end if ended[i] >= ended[by_end[2]]]
    assert [t.id async for t in q.list(status="failed", since=ended[by_end[2]] / 1000)] == since_third
    assert [t.id async for t in q.list(status="failed", since=dt.timedelta(hours=1))] == by_end
    assert [t.id async for t in q.list(status="failed", task_type="other")] == []
    await q.close()


async def test_each_live_status_is_listed_from_its_own_index(storage_url):
    q = await qo.connect(storage_url, queue="q")
    parent = await q.submit("p", 1)
    child = await q.submit("c", 1, depends_on=[parent.id])
    later = await q.submit("c", 2, schedule_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    running = await q.submit("r", 3)
    now_ = await q.submit("p", 4)
    # claim one by hand: running, named by a worker record
    book = LeaseBook(q.store, "w-test", q.clock, lease_ttl=30)
    marker = keys.parse_marker(running.marker_key("q", q.clock.now()))
    await book.announce({running.id: {"lease": "L1", "type": "r"}})
    assert isinstance(await claim(q.store, marker, worker_id="w-test", lease_id="L1", lease_ttl=30,
                                  now=q.clock.now()), object)
    assert {t.id async for t in q.list(status="pending")} == {parent.id, later.id, now_.id}
    assert [t.id async for t in q.list(status="pending", task_type="c")] == [later.id]
    assert [t.id async for t in q.list(status="blocked")] == [child.id]
    assert [t.id async for t in q.list(status="running")] == [running.id]
    assert [t.id async for t in q.list(newest_first=True)] == [now_.id, running.id, later.id, child.id, parent.id]
    assert [t.id async for t in q.list(status="pending", newest_first=True)] == [now_.id, later.id, parent.id]
    await q.close()


async def test_a_stale_index_entry_is_skipped_and_repaired_by_recovery(storage_url):
    q = await qo.connect(storage_url, queue="q")
    made = await build(q, 0, failures=1, cancels=1)
    retried = await q.retry(made["bad"][0].id)  # leaves the failed index
    assert [t async for t in q.list(status="failed")] == []
    assert retried.status == "pending"
    # a stale entry (its task pending again) is verified away, not listed
    await q.storage.put(keys.ended("q", "failed", 1_700_000_000, retried.id, "bad"), b"")
    assert [t async for t in q.list(status="failed")] == []
    # a worker that died between its dead-letter CAS and the index write: recovery writes it
    task = await q.submit("bad", 9, max_retries=0)
    book = LeaseBook(q.store, "dead-worker", q.clock, lease_ttl=0.01)
    await book.announce({task.id: {"lease": "L", "type": "bad"}})
    got = await claim(q.store, keys.parse_marker(task.marker_key("q", q.clock.now())), worker_id="dead-worker",
                      lease_id="L", lease_ttl=0.01, now=q.clock.now())
    await finish(q.store, got.task, got.etag, failed(qo.Fail("x"), None, q.clock.now()), q.clock.now())
    assert [t async for t in q.list(status="failed")] == []  # not indexed yet: it "died" here
    await asyncio.sleep(0.05)
    await sweep(q.store, q.clock, self_id="someone-else")
    assert [t.id async for t in q.list(status="failed")] == [task.id]
    await q.close()


async def test_stats_count_by_status_at_a_bounded_cost(storage_url):
    small, large = await counted(storage_url, "small"), await counted(storage_url, "large")
    await build(small, 10)
    await build(large, 120)
    costs = []
    for q in (small, large):
        await q.submit("waiting", 1, schedule_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
        await q.submit("high", 1, priority="high")
        stats, cost, _ = await requests_of(q, q.stats())
        assert stats["counts"]["failed"] == 3 and stats["counts"]["cancelled"] == 2
        assert stats["counts"]["pending"] == 2 and stats["ready"] == 1 and stats["delayed"] == 1
        assert stats["ready_by_band"]["high"] == 1 and stats["dead_letters"] == 3
        assert all(stats["exact"][s] for s in ("pending", "failed", "cancelled", "blocked"))
        assert 0 <= stats["oldest_due_age_s"] < 60 and 3500 < stats["next_delayed_in_s"] <= 3601  # the server clock offset may move between calls
        costs.append(cost)
    assert costs[0] == costs[1], costs  # no task is read: history does not matter
    await small.close()
    await large.close()


async def test_stats_show_live_workers_with_their_counters(storage_url):
    q = await qo.connect(storage_url, queue="q")
    for i in range(5):
        await q.submit("t", i)
    w = Worker(q, concurrency=2, heartbeat_interval=0.3, **FAST)  # the record's counters: each heartbeat
    release = asyncio.Event()

    @w.handler("t")
    async def t(input):
        if input == 4:
            await release.wait()
        return input

    run = asyncio.create_task(w.run())
    for _ in range(200):
        stats = await q.stats()
        mine = [x for x in stats["workers"] if x["worker_id"] == w.worker_id]
        if mine and mine[0]["completed"] == 4 and mine[0]["running"] == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(stats)
    assert stats["live_workers"] == 1 and mine[0]["alive"] and mine[0]["heartbeat_age_s"] < 30
    release.set()
    w.stop()
    await run
    await q.close()


def test_cli_stats_and_list_options(storage_url):
    async def setup():
        q = await qo.connect(storage_url, queue="q")
        made = await build(q, 3, failures=3, cancels=1)
        await q.close()
        return made

    made = asyncio.run(setup())
    runner = CliRunner()
    base = ["--url", storage_url, "--queue", "q"]
    out = runner.invoke(cli, ["stats", *base])
    assert out.exit_code == 0, out.output
    assert "failed 3 (dead letters)" in out.stdout and "cancelled 1" in out.stdout
    out = runner.invoke(cli, ["stats", "--json", *base])
    assert json.loads(out.stdout)["counts"]["failed"] == 3
    out = runner.invoke(cli, ["list", "--status", "failed", "--newest-first", "--since", "1h", "--limit", "2", *base])
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == 3  # header + 2 rows
    assert "more tasks match than the 2 shown" in out.stderr
    out = runner.invoke(cli, ["list", "--status", "failed", "--since", "soon", *base])
    assert out.exit_code == 1 and "--since" in out.stderr
    out = runner.invoke(cli, ["list", "--status", "cancelled", "--json", *base])
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == [made["gone"][0].id]


@pytest.mark.parametrize("since", [dt.timedelta(hours=-1), "1h", float("nan"), True])
async def test_bad_since_is_an_error_naming_it(queue, since):
    with pytest.raises(qo.InvalidInput, match="since"):
        [t async for t in queue.list(since=since)]


async def test_stats_running_counts_handlers_not_candidates(storage_url):
    """A worker's record names the candidates it is about to claim too; stats() shows how
    many handlers run (the record's own count), never more than the concurrency."""
    import asyncio

    from conftest import FAST

    q = await qo.connect(storage_url, queue="q")
    try:
        await q.submit_many([("block", None)] * 12)
        release = asyncio.Event()
        started = []
        w = qo.Worker(q, 2, **dict(FAST, heartbeat_interval=0.1))

        @w.handler("block")
        async def block(input, ctx):
            started.append(1)
            await release.wait()

        runner = asyncio.create_task(w.run(until_idle=True))
        for _ in range(200):
            await asyncio.sleep(0.05)
            if len(started) == 2:
                break
        await asyncio.sleep(0.3)  # a heartbeat writes the count
        stats = await q.stats()
        mine = [x for x in stats["workers"] if x["worker_id"] == w.worker_id][0]
        assert stats["counts"]["running"] == 2 and mine["running"] == 2
        assert mine["leases"] >= 2
        release.set()
        await asyncio.wait_for(runner, 60)
    finally:
        await q.close()
