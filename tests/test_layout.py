"""A queue's key layout: its per-task keys spread over shard prefixes (qo/layout.py,
docs/architecture.md §10). Every test runs on each backend."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import multiprocessing
import os
import random

import pytest
from click.testing import CliRunner

import qo
from qo import keys
from qo.cli import cli
from qo.counting import CountingStorage
from qo.errors import ConfigurationError, InvalidInput
from qo.layout import Layout, SPREAD_KINDS
from qo.worker import Worker

import procs

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)
CTX = multiprocessing.get_context("spawn")


async def stored(q: qo.Queue, kind: str) -> list[str]:
    """The keys of ``kind`` as the backend holds them."""
    return [e.key for e in await q.backend.list(f"{q.name}/{kind}/")]


def shard_dir(key: str) -> str:
    return key.split("/")[2]


async def test_a_spread_queue_stores_each_kind_in_its_shards_and_works_as_before(storage_url):
    q = await qo.connect(storage_url, queue="sp", wrap_storage=CountingStorage)
    assert await q.set_layout(4) == Layout(4, recorded=True)
    singles = await q.submit_many([("t", i, {"priority": 200 if i % 2 else 10}) for i in range(24)], bulk=False)
    later = await q.submit("other", "later", schedule_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    packed = await q.submit_many([("t", 100 + i) for i in range(40)])
    assert keys.pack_of(packed[0].id) is not None

    # every per-task key sits in a shard directory drawn from its id; a task and its marker share one
    for kind in SPREAD_KINDS:
        for key in await stored(q, kind):
            assert shard_dir(key) in {"00", "01", "02", "03"}, key
    task_keys = await stored(q, "tasks")
    assert len(task_keys) == 25 and len({shard_dir(k) for k in task_keys}) > 1
    for t in singles:
        where = q.storage.stored_key(keys.task("sp", t.id), 4)
        assert where in task_keys
        marker = q.storage.stored_key(keys.ready("sp", t.priority, t.available_at, t.id, t.task_type), 4)
        assert shard_dir(marker) == shard_dir(where)
    assert len(await stored(q, "delayed")) == 1 and len(await stored(q, "packs")) == 1

    # get(id) is still one GET, in or out of a pack
    q.backend.reset()
    assert (await q.get(singles[5].id)).input == 5 and (await q.get(packed[7].id)).input == 107
    assert q.backend.counts() == {"GET": 2}

    # listings merge the shards in id order, both ways
    submitted = [t.id for t in singles] + [later.id] + [t.id for t in packed]
    assert [t.id async for t in q.list(limit=None)] == submitted
    assert [t.id async for t in q.list(limit=None, newest_first=True)] == submitted[::-1]
    stats = await q.stats()
    assert (stats["counts"]["pending"], stats["ready"], stats["delayed"], stats["shards"]) == (65, 64, 1, 4)

    # a worker drains it, each shard in priority order (one slot: the order is the claim
    # order; a worker lists one shard a refill, in turn)
    w = Worker(q, concurrency=1, **FAST)
    ran: list[str] = []

    @w.handler("t")
    async def t(value, ctx):
        ran.append(ctx.task.id)

    await asyncio.wait_for(w.run(until_idle=True), 60)
    assert sorted(ran) == sorted(submitted[:24] + submitted[25:])
    priority = {t.id: t.priority for t in singles + packed}
    for shard in range(4):
        order = [priority[i] for i in ran if int(i[16:18], 16) % 4 == shard]
        assert order == sorted(order, reverse=True), (shard, order)
    assert collections.Counter([t.status async for t in q.list(limit=None)]) == {"completed": 64, "pending": 1}
    assert await stored(q, "ready") == []
    await q.close()


async def test_listing_a_spread_queue_is_the_listing_of_its_logical_keys(storage_url):
    """Any prefix, any start, any page size: the merge of the shards' listings is the
    flat, ordered listing of the keys as the engine wrote them."""
    q = await qo.connect(storage_url, queue="m")
    await q.set_layout(4)
    rng = random.Random(7)

    def tid() -> str:
        return f"{rng.randrange(16**12):012x}{rng.randrange(16**12):012x}"

    written = [keys.task("m", tid()) for _ in range(14)]
    written += [keys.ready("m", rng.choice([0, 128, 255]), rng.uniform(1e9, 2e9), tid(), "t") for _ in range(14)]
    written += [keys.delayed("m", 5, rng.uniform(1e9, 2e9), tid(), "t") for _ in range(4)]
    written += ["m/tasks/not-an-id.json", "m/deps/a/b", "m/workers/w.json", "m/ended/failed/x"]
    for key in written:
        await q.storage.put(key, b"x")
    logical = sorted(written + ["m/settings.json"])
    for stray in ("m/tasks/~odd", "m/ready/zz", "m/delayed/\u00e9t\u00e9"):  # stored outside every shard:
        await q.backend.put(stray, b"x")  # not in the queue's listings (doctor --scan names them)
    assert len({shard_dir(k) for k in await stored(q, "tasks")}) > 1

    async def listed(prefix: str, after: str | None, limit: int) -> list[str]:
        return [e.key for e in await q.storage.list(prefix, start_after=after, limit=limit)]

    for prefix in ("m/", "m/tasks/", "m/ready/", "m/ready/127/", "m/t", "m/d", "m"):
        expect = [k for k in logical if k.startswith(prefix)]
        for after in (None, "m/", "m/ready/", "m/re", "m/tasks/8", "m/workers/", expect[len(expect) // 2]):
            for limit in (1, 5, 1000):
                want = [k for k in expect if after is None or k > after][:limit]
                assert await listed(prefix, after, limit) == want, (prefix, after, limit)
        pages, cursor = [], None  # paging with start_after walks every key once
        while True:
            page = await listed(prefix, cursor, 3)
            pages += page
            if len(page) < 3:
                break
            cursor = page[-1]
        assert pages == expect
    # reads, deletes and batch deletes find the stored keys
    assert (await q.storage.get(written[0])).data == b"x"
    await q.storage.delete(written[0])
    await q.store.delete_markers(written[14:20])
    assert [e.key for e in await q.storage.list("m/")] == sorted(set(logical) - {written[0]} - set(written[14:20]))
    await q.close()


async def test_a_layout_is_recorded_before_the_first_task_and_never_changes(storage_url):
    q = await qo.connect(storage_url, queue="lay")
    for bad in (3, 0, 512, "x", True, None):
        with pytest.raises(InvalidInput) as err:
            await q.set_layout(bad)
        assert err.value.field == "shards"
    assert await q.backend.list("lay/") == []  # refused before anything was written
    assert await q.layout() == Layout(1, recorded=False)  # flat, as every queue before layouts
    assert await q.set_layout(8) == Layout(8, recorded=True)
    assert await q.set_layout(8) == Layout(8, recorded=True)  # the same again: nothing to do
    with pytest.raises(InvalidInput, match="never changes") as err:
        await q.set_layout(4)
    assert err.value.field == "shards"
    await q.settings.set(max_retries=5)  # the shared settings live beside it; writing them keeps it
    await q.settings.unset("max_retries")
    other = await qo.connect(storage_url, queue="lay")
    assert await other.layout() == Layout(8, recorded=True)
    task = await other.submit("t", 1)
    assert shard_dir((await stored(other, "tasks"))[0]) == f"{int(task.id[16:18], 16) % 8:02x}"
    await other.close()

    busy = await qo.connect(storage_url, queue="busy")  # a queue with tasks keeps its (flat) layout
    task = await busy.submit("t", 1)
    with pytest.raises(InvalidInput, match="already holds tasks"):
        await busy.set_layout(4)
    assert await stored(busy, "tasks") == [keys.task("busy", task.id)]
    assert (await busy.get(task.id)).input == 1
    assert (await busy.stats())["shards"] == 1
    await busy.close()

    runner = CliRunner()

    def qo_cli(*args: str):
        return runner.invoke(cli, [*args, "--url", storage_url], catch_exceptions=False)

    result = await asyncio.to_thread(qo_cli, "layout", "set", "--shards", "3", "--queue", "fresh")
    assert result.exit_code == 1 and "error: --shards: 3 is not a shard count" in result.output
    result = await asyncio.to_thread(qo_cli, "layout", "set", "--shards", "16", "--queue", "busy")
    assert result.exit_code == 1 and "error: --shards:" in result.output and "already holds tasks" in result.output
    result = await asyncio.to_thread(qo_cli, "layout", "set", "--shards", "16", "--queue", "fresh")
    assert result.exit_code == 0, result.output
    assert "16 shards" in result.output and "fresh/tasks/{00..0f}/" in result.output
    result = await asyncio.to_thread(qo_cli, "layout", "--json", "--queue", "lay")
    assert json.loads(result.output)["shards"] == 8
    result = await asyncio.to_thread(qo_cli, "layout", "--queue", "busy")
    assert "flat (no layout recorded)" in result.output
    result = await asyncio.to_thread(qo_cli, "stats", "--queue", "lay")
    assert result.exit_code == 0 and "keys in 8 shards" in result.output.splitlines()[0]
    await q.close()


async def test_a_layout_this_release_cannot_read_stops_the_queue_with_a_clear_error(storage_url):
    q = await qo.connect(storage_url, queue="odd")
    for layout, words in (({"schema": 1, "shards": 3}, "3 is not a shard count"),
                          ({"schema": 9, "shards": 4}, "upgrade qo"), ("four", "not a layout record")):
        doc = {"schema": 1, "settings": {}, "layout": layout}
        await q.backend.put("odd/settings.json", json.dumps(doc).encode())
        fresh = await qo.connect(storage_url, queue="odd")
        with pytest.raises(ConfigurationError, match=words) as err:
            await fresh.get("0" * 24)
        assert "odd/settings.json" in str(err.value)
        await fresh.close()
    await q.close()


async def test_processes_racing_to_lay_out_one_queue_agree_on_one_layout(storage_url):
    with CTX.Pool(4) as pool:
        results = [pool.apply_async(procs.set_layout, (storage_url, "race", shards)) for shards in (2, 4, 8, 16)]
        outcomes = await asyncio.get_running_loop().run_in_executor(None, lambda: [r.get(timeout=120) for r in results])
    won = [o for o in outcomes if isinstance(o, int)]
    assert len(set(won)) == 1 and len(won) >= 1, outcomes  # whoever lost was told which layout won
    assert all("laid out in" in o for o in outcomes if isinstance(o, str)), outcomes
    q = await qo.connect(storage_url, queue="race")
    assert await q.layout() == Layout(won[0], recorded=True)
    await q.close()


async def test_two_worker_processes_drain_a_spread_queue_running_each_task_once(storage_url, tmp_path):
    q = await qo.connect(storage_url, queue="sprace")
    await q.set_layout(8)
    tasks = await q.submit_many([("count", i) for i in range(120)], bulk=False)
    tasks += await q.submit_many([("count", i) for i in range(400)])
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with CTX.Pool(2) as pool:
        results = [pool.apply_async(procs.run_counting_worker, (storage_url, "sprace", str(log_dir), 8, 0.005))
                   for _ in range(2)]
        stats = await asyncio.get_running_loop().run_in_executor(None, lambda: [r.get(timeout=240) for r in results])
    runs: collections.Counter[str] = collections.Counter()
    for f in log_dir.iterdir():
        runs.update(f.read_text().split())
    assert set(runs) == {t.id for t in tasks} and max(runs.values()) == 1
    assert sum(s.get("completed", 0) for s in stats) == 520
    assert collections.Counter([t.status async for t in q.list(limit=None)]) == {"completed": 520}
    assert await stored(q, "ready") == []
    await q.close()


async def test_tasks_due_later_are_promoted_from_every_shard_of_a_spread_queue(storage_url):
    q = await qo.connect(storage_url, queue="spd")
    await q.set_layout(8)
    due = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)
    tasks = [await q.submit("t", i, schedule_at=due) for i in range(16)]
    assert len({shard_dir(k) for k in await stored(q, "delayed")}) > 1
    w = Worker(q, concurrency=4, **FAST)
    started: dict[int, float] = {}

    @w.handler("t")
    async def t(value):
        started[value] = q.clock.now()

    await asyncio.wait_for(w.run(until_idle=True), 30)
    assert sorted(started) == list(range(16))
    assert min(started.values()) >= tasks[0].available_at - 0.05  # not before its time
    assert await stored(q, "delayed") == [] and await stored(q, "ready") == []
    await q.close()


async def test_doctor_scan_names_the_keys_a_spread_queue_s_layout_does_not_place(storage_url):
    from qo.scan import scan

    q = await qo.connect(storage_url, queue="stray")
    await q.set_layout(4)
    task = await q.submit("t", 1)
    home = shard_dir(q.storage.stored_key(keys.task("stray", task.id), 4))
    wrong = f"{(int(home, 16) + 1) % 4:02x}"
    blob = await q.storage.get(keys.task("stray", task.id))
    await q.backend.put(f"stray/tasks/{wrong}/{task.id}.json", blob.data)  # a copy in the wrong shard
    await q.backend.put("stray/tasks/junk.json", b"{}")  # outside every shard
    await q.backend.put("stray/ready/09/127/x", b"")  # a shard the layout does not have
    found = {f.key: f.reason async for f in scan(q)}
    assert set(found) == {f"stray/tasks/{wrong}/{task.id}.json", "stray/tasks/junk.json", "stray/ready/09/127/x"}
    assert f"belongs in shard {home}" in found[f"stray/tasks/{wrong}/{task.id}.json"]
    assert "outside the 4 shard directories" in found["stray/tasks/junk.json"]
    assert (await q.get(task.id)).status == "pending"  # the queue goes on
    await q.close()


async def test_an_idle_worker_of_a_spread_queue_backs_off_after_each_empty_turn_of_shards(storage_url):
    """An empty shard is followed by the next at once, but a whole empty turn backs off as
    a flat queue's empty listing does: in 1 s from 0.01 s doubling to 0.2 s, about 8
    turns of 8 shards (ready and delayed), not a turn every 0.01 s."""
    q = await qo.connect(storage_url, queue="idle", wrap_storage=CountingStorage)
    await q.set_layout(8)
    w = Worker(q, poll_min=0.01, poll_max=0.2, sweep_interval=5.0, buffer_max_age=0.5)
    w.handler("t")(lambda x: x)
    run = asyncio.create_task(w.run())
    await asyncio.sleep(0.3)  # started: settings read, record written
    q.backend.reset()
    await asyncio.sleep(1.0)
    lists = q.backend.counts().get("LIST", 0)
    w.stop()
    await asyncio.wait_for(run, 10)
    assert 16 <= lists <= 130, lists  # ~80; a turn every 0.01 s: 160-700 (the LISTs' own time bounds it)
    await q.close()
