"""One bad object costs at most that object (issue 15): garbage planted where qo reads
(tasks, worker records, schedules, limits) is skipped, reported once with its key, and
counted; the worker, the scheduler and the CLI go on serving everything else. Every
test runs on each backend."""

from __future__ import annotations

import asyncio
import logging

import pytest
from click.testing import CliRunner

import qo
from qo import keys
from qo.cli import cli
from qo.clock import FakeClock
from qo.counting import CountingStorage
from qo.scheduler import Scheduler
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)

BAD_RECORDS = [
    b'{"worker_id":"evil","heartbeat_at":0,"lease_ttl":"x","leases":{}}',
    b"[]",
    b"{",
    b'{"worker_id":"evil2","heartbeat_at":0,"lease_ttl":30,"leases":[1]}',
    b'{"worker_id":"evil3","heartbeat_at":0,"lease_ttl":30,"leases":{"' + b"a" * 24 + b'":5}}',
]


def unreadable_lines(caplog, key: str) -> int:
    return sum(1 for r in caplog.records if r.name == "qo.bad_objects" and key in r.getMessage())


async def drain(q, types=("t",), timeout: float = 20.0, **settings) -> Worker:
    w = Worker(q, concurrency=4, **{**FAST, **settings})
    for t in types:
        w.handler(t)(lambda input: input)
    await asyncio.wait_for(w.run(until_idle=True), timeout)
    return w


async def plant(q, key: str, data: bytes) -> None:
    await q.storage.put(key, data)


async def test_malformed_worker_records_do_not_stop_housekeeping(storage_url, caplog):
    caplog.set_level(logging.WARNING)
    q = await qo.connect(storage_url, queue="q")
    for i, data in enumerate(BAD_RECORDS):
        await plant(q, f"q/workers/evil{i}.json", data)
    import datetime as dt

    later = await q.submit("t", "delayed", schedule_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.3))
    now = await q.submit("t", "now")
    w = await drain(q)
    assert (await q.get(later.id)).status == "completed"  # promotion (housekeeping) went on
    assert (await q.get(now.id)).status == "completed"
    assert w.stats["completed"] == 2
    for i in range(len(BAD_RECORDS)):  # each reported once, though swept many times
        assert unreadable_lines(caplog, f"q/workers/evil{i}.json") == 1
    # the healthy worker's record is gone (clean stop); the bad ones are left alone
    left = sorted(e.key for e in await q.storage.list("q/workers/"))
    assert left == sorted(f"q/workers/evil{i}.json" for i in range(len(BAD_RECORDS)))
    await q.close()


async def test_an_undecodable_task_is_skipped_and_leaves_no_lease_in_the_record(storage_url, caplog):
    caplog.set_level(logging.WARNING)
    q = await qo.connect(storage_url, queue="q")
    bad_id = "0" * 23 + "1"
    await plant(q, keys.task("q", bad_id), b'{"id":"' + bad_id.encode() + b'","task_type":"t","status":"pending",'
                b'"timeout_seconds":"abc"}')
    await plant(q, keys.ready("q", 128, q.clock.now() - 1, bad_id, "t"), b"")
    good = await q.submit("t", 1)
    w = await drain(q)
    assert (await q.get(good.id)).status == "completed"
    assert w.stats["bad_objects"] >= 1 and unreadable_lines(caplog, keys.task("q", bad_id)) == 1
    assert await q.storage.list("q/workers/") == []  # no poisoned lease written back on stop
    with pytest.raises(qo.CorruptObject, match="timeout_seconds"):
        await q.get(bad_id)
    await q.close()


async def test_a_task_whose_id_differs_from_its_key_costs_a_few_requests_not_a_hot_loop(storage_url):
    counting: list[CountingStorage] = []

    def wrap(s):
        counting.append(CountingStorage(s))
        return counting[0]

    q = await qo.connect(storage_url, queue="q", wrap_storage=wrap)
    real = await q.submit("other", 1)  # a task of a type nobody here runs
    copy_id = "f" * 24
    await q.storage.put(keys.task("q", copy_id), (await q.storage.get(keys.task("q", real.id))).data)
    await q.storage.put(keys.ready("q", 128, q.clock.now() - 1, copy_id, "other"), b"")
    w = Worker(q, concurrency=4, **{**FAST, "orphan_grace": 1.0})
    w.handler("other")(lambda input: input)
    counting[0].reset()
    run = asyncio.create_task(w.run())
    await asyncio.sleep(2.0)
    w.stop()
    await asyncio.wait_for(run, 10)
    assert (await q.get(real.id)).status == "completed"
    gets = counting[0].counts().get("GET", 0)
    assert gets < 40, counting[0].counts()  # the bug: ~14,000 GETs in 8 s
    # the bad copy's marker was dropped after the orphan grace; the object stays for a person
    assert [e.key for e in await q.storage.list("q/ready/")] == []
    await q.close()


class FailTaskWrites:
    """Conditional writes of tasks fail (StorageUnavailable) while ``failing``."""

    def __init__(self, inner):
        self.inner, self.name, self.failing, self.refused = inner, inner.name, False, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def put(self, key, data, **kw):
        if self.failing and "/tasks/" in key and kw.get("if_match"):
            self.refused += 1
            raise qo.StorageUnavailable("injected outage", backend=self.name, key=key)
        return await self.inner.put(key, data, **kw)


async def test_an_outcome_write_that_fails_for_a_while_is_stored_later_and_the_record_names_it_meanwhile(storage_url):
    q = await qo.connect(storage_url, queue="q", wrap_storage=FailTaskWrites)
    q.store.backoff.attempts = 2  # the outage outlasts the store's own retries
    task = await q.submit("t", 1)
    w = Worker(q, concurrency=2, **FAST)
    handler_done = asyncio.Event()

    @w.handler("t")
    async def t(input):
        q.storage.failing = True  # from now on the outcome cannot be written
        handler_done.set()
        return "ok"

    run = asyncio.create_task(w.run(until_idle=True))
    await asyncio.wait_for(handler_done.wait(), 10)
    await asyncio.sleep(1.0)
    assert q.storage.refused >= 2
    assert (await q.get(task.id)).status == "running"
    [record] = await q.storage.list("q/workers/")
    assert task.id in (await q.storage.get(record.key)).data.decode()  # still named: recoverable
    q.storage.failing = False
    await asyncio.wait_for(run, 20)
    done = await q.get(task.id)
    assert done.status == "completed" and done.output == "ok" and w.stats["lost_lease"] == 0
    await q.close()


async def test_anything_raising_after_the_claim_ends_the_attempt_not_a_running_task(storage_url):
    q = await qo.connect(storage_url, queue="q")
    parent = await q.submit("p", 1)
    child = await q.submit("c", 1, depends_on=[parent.id], max_retries=0)

    async def broken(task):
        raise RuntimeError("dependency results unreadable")

    w = Worker(q, concurrency=2, **FAST)
    w.handler("p")(lambda input: input)
    w.handler("c")(lambda input: input)
    q.dependencies.results = broken
    await asyncio.wait_for(w.run(until_idle=True), 20)
    done = await q.get(child.id)
    assert done.status == "failed" and "dependency results unreadable" in done.last_error["message"]
    await q.close()


async def test_a_hand_edited_task_type_gets_its_own_marker_and_runs_on_the_right_worker(storage_url):
    q = await qo.connect(storage_url, queue="q")
    task = await q.submit("a", 1)
    key = keys.task("q", task.id)
    blob = await q.storage.get(key)
    await q.storage.put(key, blob.data.replace(b'"task_type":"a"', b'"task_type":"b"'), if_match=blob.etag)
    w_a = await drain(q, types=("a",))
    assert w_a.stats["completed"] == 0 and (await q.get(task.id)).status == "pending"
    w_b = await drain(q, types=("b",))
    assert w_b.stats["completed"] == 1 and (await q.get(task.id)).status == "completed"
    await q.close()


@pytest.mark.parametrize("garbage", [b"{", b'{"name":"zbad","cron":"* * * * *","task_type":"tick","next_fire_at":"soon"}'])
async def test_one_corrupt_schedule_does_not_stop_the_others(storage_url, garbage, caplog):
    caplog.set_level(logging.WARNING)
    clock = FakeClock(1_800_000_000.0)
    q = await qo.connect(storage_url, queue="q", clock=clock)
    await q.schedules.add("every_second", cron="* * * * * *", task_type="tick")
    await plant(q, "q/schedules/zbad.json", garbage)
    s = Scheduler(q)
    fired = 0
    for _ in range(4):
        clock.advance(1.0)
        fired += len(await s.run_once())
    assert fired == 4
    assert s.stats["bad_objects"] == 1 and unreadable_lines(caplog, "q/schedules/zbad.json") == 1
    assert [x.name for x in await q.schedules.list()] == ["every_second"]
    await q.schedules.remove("zbad")  # an operator can remove it
    assert [e.key for e in await q.storage.list("q/schedules/")] == ["q/schedules/every_second.json"]
    await q.close()


def test_cli_inspection_goes_on_past_corrupt_objects(storage_url):
    bad_id = "0" * 23 + "2"

    async def setup():
        q = await qo.connect(storage_url, queue="q")
        good = await q.submit("t", 1)
        await plant(q, keys.task("q", bad_id), b"{")
        await q.schedules.add("fine", cron="0 3 * * *", task_type="t")
        await plant(q, "q/schedules/zbad.json", b"[]")
        await q.limits.set("task_type:t", rate=5)
        await plant(q, "q/limits/defs/global.json", b'{"scope":"global","rate":"fast"}')
        await q.close()
        return good

    good = asyncio.run(setup())
    runner = CliRunner()
    base = ["--url", storage_url, "--queue", "q"]

    out = runner.invoke(cli, ["list", *base])
    assert out.exit_code == 0 and good.id in out.stdout and "1 unreadable object skipped" in out.stderr
    out = runner.invoke(cli, ["status", bad_id, *base])
    assert out.exit_code == 1 and "unreadable object" in out.stderr and "Traceback" not in out.output
    out = runner.invoke(cli, ["cancel", bad_id, *base])
    assert out.exit_code == 1 and "unreadable object" in out.stderr
    out = runner.invoke(cli, ["schedule", "list", *base])
    assert out.exit_code == 0 and "fine" in out.stdout and "1 unreadable object skipped" in out.stderr
    out = runner.invoke(cli, ["limit", "list", *base])
    assert out.exit_code == 0 and "task_type:t" in out.stdout and "1 unreadable object skipped" in out.stderr
    out = runner.invoke(cli, ["doctor", "--scan", *base])
    assert out.exit_code == 1
    assert {line.split(":")[0] for line in out.stdout.splitlines()} == {
        keys.task("q", bad_id), "q/schedules/zbad.json", "q/limits/defs/global.json"}


@pytest.mark.parametrize("definition", [b'{"scope":"global","rate":"fast"}', b'{"scope":"global","rate":-5}', b"{"])
async def test_a_tampered_limit_stops_nothing(storage_url, definition):
    counting: list[CountingStorage] = []

    def wrap(s):
        counting.append(CountingStorage(s))
        return counting[0]

    q = await qo.connect(storage_url, queue="q", wrap_storage=wrap)
    await q.limits.set("task_type:t", rate=1000)
    await plant(q, "q/limits/defs/global.json", definition)
    await plant(q, "q/limits/state/type.t.json", b'{"tokens":"many"')
    tasks = [await q.submit("t", i) for i in range(5)]
    counting[0].reset()
    w = await drain(q)
    assert all([(await q.get(t.id)).status == "completed" for t in tasks])
    assert w.stats["throttled"] == 0 and counting[0].total < 400  # the bug: 27,000 throttle loops in 4 s
    state = (await q.storage.get("q/limits/state/type.t.json")).data
    assert b'"tokens"' in state and b'"many"' not in state  # replaced by a full bucket, then used
    await q.close()


async def test_a_worker_reaches_its_own_types_behind_any_number_of_others(storage_url, backend):
    q = await qo.connect(storage_url, queue="q")
    n = 1100 if backend == "local" else 40  # past a whole LIST page on local; past the head elsewhere
    old = q.clock.now() - 60
    await asyncio.gather(*(q.storage.put(keys.ready("q", 200, old + i / 1000, f"{i:024x}", "foreign"), b"")
                           for i in range(n)))
    mine = await q.submit("b", 1, priority=200)
    w = await drain(q, types=("b",), timeout=30)
    assert (await q.get(mine.id)).status == "completed" and w.stats["completed"] == 1
    assert len(await q.storage.list("q/ready/", limit=1000)) == min(n, 1000)  # others' untouched
    await q.close()


async def test_a_store_nested_under_the_root_is_not_ours(storage_url):
    base, sep, query = storage_url.partition("?")
    nested_url = base.rstrip("/") + "/q" + sep + query
    inner = await qo.connect(nested_url, queue="ready")  # its keys: <root>/q/ready/ready/...
    theirs = await inner.submit("t", 1)
    outer = await qo.connect(storage_url, queue="q")
    mine = await outer.submit("t", 2)
    w = await drain(outer, **{"orphan_grace": 0.01})
    assert w.stats["completed"] == 1 and (await outer.get(mine.id)).status == "completed"
    assert (await inner.get(theirs.id)).status == "pending"
    assert len(await inner.storage.list("ready/ready/")) == 1  # its marker is still there
    await inner.close()
    await outer.close()


async def test_an_unreadable_dependent_does_not_hold_back_its_siblings(storage_url):
    q = await qo.connect(storage_url, queue="q")
    parent = await q.submit("p", 1)
    good = await q.submit("c", 1, depends_on=[parent.id])
    bad = await q.submit("c", 2, depends_on=[parent.id])
    await plant(q, keys.task("q", bad.id), b'{"id": "' + bad.id.encode() + b'", "task_type": "c", "status": 7}')
    w = await drain(q, types=("p", "c"))
    assert (await q.get(good.id)).status == "completed" and w.stats["completed"] == 2
    assert await q.storage.list("q/deps/") == []  # its edge went with it; the object stays
    with pytest.raises(qo.CorruptObject):
        await q.get(bad.id)
    await q.close()
