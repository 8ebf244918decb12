"""Idempotency keys on both backends: duplicates, scopes, conflicts, TTL, races, crashes."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

import qo
from qo import keys
from qo.clock import FakeClock
from qo.errors import StorageUnavailable
from qo.idempotency import decode_record, record_key, sweep_expired

CTX = multiprocessing.get_context("spawn")


async def task_ids(queue) -> list[str]:
    return [t.id async for t in queue.list(limit=None)]


async def test_the_same_key_returns_the_same_task(queue):
    first = await queue.submit("email", {"to": "a", "n": 1}, idempotency_key="order-1")
    again = await queue.submit("email", {"n": 1, "to": "a"}, idempotency_key="order-1")  # key order differs
    assert again.id == first.id
    assert await task_ids(queue) == [first.id]
    assert len(await queue.storage.list(keys.ready_prefix(queue.name))) == 1


async def test_scopes_are_separate(queue):
    a = await queue.submit("email", 1, idempotency_key="k")
    b = await queue.submit("sms", 1, idempotency_key="k")  # task_type scope: another type, another task
    c = await queue.submit("email", 1, idempotency_key="k", idempotency_scope="queue")
    d = await queue.submit("email", 1, idempotency_key="k", idempotency_scope="custom:billing")
    e = await queue.submit("email", 1, idempotency_key="k", idempotency_scope="custom:shipping")
    assert len({a.id, b.id, c.id, d.id, e.id}) == 5
    assert (await queue.submit("email", 1, idempotency_key="k", idempotency_scope="custom:billing")).id == d.id


async def test_a_different_input_or_type_is_a_conflict_naming_key_and_task(queue):
    first = await queue.submit("email", {"to": "a"}, idempotency_key="order-7")
    with pytest.raises(qo.IdempotencyConflict) as err:
        await queue.submit("email", {"to": "b"}, idempotency_key="order-7")
    assert "order-7" in str(err.value) and first.id in str(err.value)
    await queue.submit("email", 1, idempotency_key="shared", idempotency_scope="queue")
    with pytest.raises(qo.IdempotencyConflict) as err:
        await queue.submit("sms", 1, idempotency_key="shared", idempotency_scope="queue")
    assert "'email'" in str(err.value) and "'sms'" in str(err.value)
    assert len(await task_ids(queue)) == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"idempotency_key": "x" * 2000}, "idempotency_key"),
    ({"idempotency_key": "k", "idempotency_scope": "everything"}, "idempotency_scope"),
    ({"idempotency_key": "k", "idempotency_scope": "custom:../x"}, "idempotency_scope"),
    ({"idempotency_key": "k", "idempotency_ttl_days": 0}, "idempotency_ttl_days"),
    ({"idempotency_key": "k", "idempotency_ttl_days": "7"}, "idempotency_ttl_days"),
])
async def test_bad_idempotency_arguments_write_nothing(queue, kwargs, field):
    with pytest.raises(qo.InvalidInput) as err:
        await queue.submit("email", 1, **kwargs)
    assert err.value.field == field
    assert await queue.storage.list(f"{queue.name}/") == []


async def test_the_key_expires_after_its_ttl_and_records_are_swept(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="ttl", clock=clock)
    first = await q.submit("email", 1, idempotency_key="k", idempotency_ttl_days=1)
    clock.advance(86400 - 10)
    assert (await q.submit("email", 1, idempotency_key="k", idempotency_ttl_days=1)).id == first.id
    other = await q.submit("email", 2, idempotency_key="other", idempotency_ttl_days=30)
    clock.advance(20)  # past the first key's TTL
    fresh = await q.submit("email", 2, idempotency_key="k", idempotency_ttl_days=1)  # may even differ now
    assert fresh.id != first.id
    clock.advance(86400 + 1)  # the renewed "k" expires too; "other" lives on
    assert await sweep_expired(q, None) is None
    remaining = [json.loads((await q.storage.get(e.key)).data)["key"]
                 for e in await q.storage.list(keys.idem_prefix("ttl"))]
    assert remaining == ["other"]
    assert (await q.submit("email", 2, idempotency_key="other", idempotency_ttl_days=30)).id == other.id
    await q.close()


def submit_once(url: str, barrier, input: dict) -> str:
    async def main() -> str:
        q = await qo.connect(url, queue="race")
        barrier.wait()
        task = await q.submit("email", input, idempotency_key="the-key")
        await q.close()
        return task.id

    return asyncio.run(main())


async def test_eight_processes_submitting_one_key_make_one_task(storage_url):
    manager = CTX.Manager()
    barrier = manager.Barrier(8)
    loop = asyncio.get_running_loop()
    with CTX.Pool(8) as pool:
        results = [pool.apply_async(submit_once, (storage_url, barrier, {"same": True})) for _ in range(8)]
        ids = await loop.run_in_executor(None, lambda: [r.get(timeout=120) for r in results])
    manager.shutdown()
    q = await qo.connect(storage_url, queue="race")
    assert len(set(ids)) == 1
    assert await task_ids(q) == [ids[0]]
    await q.close()


class CrashAfterRecord:
    """Storage whose task writes fail: a producer dying between the record and the task."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def put(self, key, data, **kw):
        if "/tasks/" in key:
            raise StorageUnavailable("injected crash", backend=self.name, key=key)
        return await self.inner.put(key, data, **kw)


async def test_a_producer_dying_between_its_writes_leaves_no_stuck_key_and_no_duplicate(storage_url):
    crashing = await qo.connect(storage_url, queue="crash", wrap_storage=CrashAfterRecord)
    crashing.store.backoff.attempts = 2
    with pytest.raises(StorageUnavailable):
        await crashing.submit("email", {"to": "a"}, idempotency_key="once")
    await crashing.close()
    q = await qo.connect(storage_url, queue="crash")
    assert await task_ids(q) == []  # the record exists, the task does not
    record = json.loads((await q.storage.get((await q.storage.list(keys.idem_prefix("crash")))[0].key)).data)
    # the retry does not wait for the TTL: it writes the task under the recorded id
    task = await q.submit("email", {"to": "a"}, idempotency_key="once")
    assert task.id == record["task_id"]
    again = await q.submit("email", {"to": "a"}, idempotency_key="once")
    assert again.id == task.id and await task_ids(q) == [task.id]
    await q.close()


async def test_works_with_submit_many_and_schedule_at(queue):
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    tasks = await queue.submit_many([
        ("email", 1, {"idempotency_key": "a", "schedule_at": later}),
        ("email", 2, {"idempotency_key": "b"}),
        ("email", 1, {"idempotency_key": "a", "schedule_at": later}),
    ])
    assert tasks[0].id == tasks[2].id != tasks[1].id
    assert len(await task_ids(queue)) == 2
    again = await queue.submit("email", 1, idempotency_key="a", schedule_at=later)
    assert again.id == tasks[0].id and again.available_at == pytest.approx(later.timestamp(), abs=0.01)


async def test_a_plugin_can_change_how_keys_are_scoped(queue):
    from qo.plugins import get_plugins

    class PerTenant:
        @qo.hookimpl
        def qo_idempotency_namespace(self, scope, key, task_type):
            return "tenant." + key.split(":", 1)[0] if ":" in key else None

    plugins = get_plugins()
    plugins.register(PerTenant(), name="per-tenant")
    try:
        await queue.submit("email", 1, idempotency_key="acme:1")
        assert [e.key.split("/")[2] for e in await queue.storage.list(keys.idem_prefix(queue.name))] == ["tenant.acme"]
        with pytest.raises(qo.IdempotencyConflict):  # one namespace per tenant, whatever the type
            await queue.submit("sms", 1, idempotency_key="acme:1")
        other = await queue.submit("sms", 1, idempotency_key="plain")  # the plugin passes: default scoping
        assert other.task_type == "sms"
    finally:
        plugins.unregister("per-tenant")


def test_cli_idempotency_options(storage_url):
    from qo.cli import cli

    runner = CliRunner()
    args = ["submit", "email", "--input", '{"to": "a"}', "--idempotency-key", "cli-1", "--url", storage_url]
    first = runner.invoke(cli, args)
    second = runner.invoke(cli, args + ["--idempotency-ttl-days", "1"])
    assert first.exit_code == 0 and second.exit_code == 0
    assert first.output == second.output
    conflict = runner.invoke(cli, ["submit", "email", "--input", '{"to": "b"}', "--idempotency-key", "cli-1",
                                   "--url", storage_url])
    assert conflict.exit_code == 1 and "cli-1" in conflict.output
    bad = runner.invoke(cli, args + ["--idempotency-scope", "nope"])
    assert bad.exit_code == 1 and "idempotency_scope" in bad.output


# -- a record holding garbage costs only itself -------------------------------------------------


def a_record(**fields) -> bytes:
    base = {"key": "k", "scope": "task_type", "namespace": "type.email", "task_id": "0" * 24,
            "task_type": "email", "input_hash": "x", "created_at": 1.0, "expires_at": 4e9}
    return json.dumps({k: v for k, v in {**base, **fields}.items() if v is not ...}).encode()


GARBAGE = {
    "truncated": b"{",
    "a list": b"[]",
    "task_id a number": b'{"task_id": 5}',
    "no expires_at": a_record(expires_at=...),
    "expires_at soon": a_record(expires_at="soon", task_id="not-an-id"),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_a_corrupt_record_is_reported_and_replaced_by_the_next_submit_of_its_key(queue, garbage, caplog):
    rk = record_key(queue.name, "type.email", "k")
    await queue.storage.put(rk, garbage)
    with caplog.at_level("WARNING", logger="qo.bad_objects"):
        task = await queue.submit("email", {"n": 1}, idempotency_key="k")
    assert queue.store.bad.count == 1 and rk in queue.store.bad.seen
    assert [r for r in caplog.records if rk in r.getMessage()]  # logged, naming the key
    record = decode_record((await queue.storage.get(rk)).data, rk)  # a usable record again
    assert record["task_id"] == task.id and record["expires_at"] > queue.clock.now()
    assert (await queue.submit("email", {"n": 1}, idempotency_key="k")).id == task.id  # the key works again
    with pytest.raises(qo.IdempotencyConflict):
        await queue.submit("email", {"n": 2}, idempotency_key="k")
    assert await task_ids(queue) == [task.id]


async def test_a_corrupt_record_naming_its_task_still_finds_that_task(queue):
    first = await queue.submit("email", {"n": 1}, idempotency_key="k")
    rk = record_key(queue.name, "type.email", "k")
    await queue.storage.put(rk, json.dumps({"task_id": first.id, "expires_at": "soon"}).encode())
    assert (await queue.submit("email", {"n": 1}, idempotency_key="k")).id == first.id  # no duplicate
    assert decode_record((await queue.storage.get(rk)).data, rk)["task_id"] == first.id
    await queue.storage.put(rk, b'{"task_id": "%s"}' % first.id.encode())
    with pytest.raises(qo.IdempotencyConflict):  # the task it names has another input
        await queue.submit("email", {"n": 2}, idempotency_key="k")
    missing = "f" * 24  # it names a task that was never written: this submit writes it under that id
    await queue.storage.put(record_key(queue.name, "type.email", "k2"), b'{"task_id": "%s"}' % missing.encode())
    assert (await queue.submit("email", 3, idempotency_key="k2")).id == missing
    assert sorted(await task_ids(queue)) == sorted([first.id, missing])
    assert queue.store.bad.count == 3


async def test_the_sweep_skips_a_corrupt_record_and_sweeps_the_others(storage_url, caplog):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="sw", clock=clock)
    try:
        old = await q.submit("email", 1, idempotency_key="old", idempotency_ttl_days=1)
        await q.submit("email", 2, idempotency_key="live", idempotency_ttl_days=30)
        bad = [record_key(q.name, "type.email", f"bad-{name}") for name in GARBAGE]
        for rk, garbage in zip(bad, GARBAGE.values()):
            await q.storage.put(rk, garbage)
        clock.advance(2 * 86400)
        with caplog.at_level("WARNING", logger="qo.bad_objects"):
            assert await sweep_expired(q, None) is None
        left = {e.key for e in await q.storage.list(keys.idem_prefix(q.name))}
        assert left == {record_key(q.name, "type.email", "live"), *bad}  # "old" swept, the garbage skipped
        assert q.store.bad.count == len(bad) and set(q.store.bad.seen) == set(bad)
        assert len([r for r in caplog.records if r.name == "qo.bad_objects"]) == len(bad)
        await sweep_expired(q, None)  # met again: counted, not logged again
        assert q.store.bad.count == 2 * len(bad)
        assert len([r for r in caplog.records if r.name == "qo.bad_objects"]) == len(bad)
        assert (await q.submit("email", 1, idempotency_key="old", idempotency_ttl_days=1)).id != old.id
    finally:
        await q.close()


async def test_a_corrupt_fire_record_is_repaired_and_the_time_fires_once(storage_url):
    from qo.scheduler import Scheduler

    clock = FakeClock(1_800_000_000.0)
    q = await qo.connect(storage_url, queue="q", clock=clock)
    try:
        s = await q.schedules.add("every5", cron="*/5 * * * *", task_type="tick")
        rk = record_key(q.name, "custom.schedule", s.fire_key(s.next_fire_at))
        await q.storage.put(rk, b"[]")
        clock.advance(300)
        [fired] = await Scheduler(q).run_once()
        assert await task_ids(q) == [fired.task_id] and q.store.bad.count == 1
        assert decode_record((await q.storage.get(rk)).data, rk)["task_id"] == fired.task_id
        assert (await q.schedules.submit_fire(s, s.next_fire_at)).id == fired.task_id  # again: the same task
    finally:
        await q.close()


async def test_the_expiry_index_sweeps_exactly_the_expired_records_at_a_cost_per_record(storage_url):
    """Issue 16: the sweep keeps up with any submit rate: it lists the expiry markers in
    expiry order and reads only the due ones (a GET and a DELETE each), however many
    records live."""
    from qo.clock import FakeClock
    from qo.counting import CountingStorage
    from qo.idempotency import sweep_expiry_index

    clock = FakeClock(1_800_000_000.0)
    q = await qo.connect(storage_url, queue="q", clock=clock, wrap_storage=CountingStorage)
    short = [await q.submit("t", i, idempotency_key=f"s{i}", idempotency_ttl_days=1) for i in range(5)]
    long_lived = [await q.submit("t", i, idempotency_key=f"l{i}", idempotency_ttl_days=30) for i in range(20)]
    assert len(await q.storage.list("q/idem-exp/")) == 25
    clock.advance(2 * 86400)
    q.storage.reset()
    assert await sweep_expiry_index(q) == 5
    counts = q.storage.counts()
    assert counts.get("GET", 0) == 5 and counts.get("DELETE", 0) == 5, counts  # none of the 20 live ones read
    assert len(await q.storage.list("q/idem/", limit=1000)) == 20 and len(await q.storage.list("q/idem-exp/")) == 20
    again = await q.submit("t", 0, idempotency_key="s0", idempotency_ttl_days=1)
    assert again.id != short[0].id  # the key is free again: a new task
    assert (await q.submit("t", 0, idempotency_key="l0", idempotency_ttl_days=30)).id == long_lived[0].id
    q.storage.reset()
    assert await sweep_expiry_index(q) == 0 and q.storage.counts().get("GET", 0) == 0  # nothing due: one LIST
    await q.close()
