"""One worker, several queues: qo.Worker([q1, q2]) under one concurrency budget, in
strict order or by weight; until_idle means every queue idle; qo worker --queue a --queue b."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

import qo
from qo.cli import build_cli
from qo.multi_worker import MultiQueueWorker, SlotGate, parse_queue_spec

from conftest import FAST


# -- the gate: deterministic -------------------------------------------------------------


async def test_gate_strict_order_gives_a_freed_slot_to_the_first_queue_waiting():
    gate = SlotGate(total=1, queues=3)
    await gate.acquire(2)  # free: taken at once, whatever the order
    order = []

    async def wait(rank):
        await gate.acquire(rank)
        order.append(rank)

    waiters = [asyncio.create_task(wait(r)) for r in (2, 1, 0)]
    await asyncio.sleep(0)
    for _ in range(3):
        gate.release(order[-1] if order else 2)
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2] and gate.free == 0 and gate.running == [0, 0, 1]


async def test_gate_weights_share_the_slots_under_load():
    gate = SlotGate(total=4, queues=2, weights=[3, 1])
    for _ in range(4):  # at start, free slots go to whoever asks
        await gate.acquire(1)
    grants = []

    async def wait(rank):
        await gate.acquire(rank)
        grants.append(rank)

    waiters = [asyncio.create_task(wait(r)) for r in [0] * 10 + [1] * 10]
    await asyncio.sleep(0)
    for _ in range(4):  # queue 1's four tasks end one by one
        gate.release(1)
        await asyncio.sleep(0)
    assert gate.running == [3, 1]  # 3 : 1, as weighted
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert gate.free == 0 and sum(gate.running) == 4  # cancelled waiters took nothing


async def test_a_cancelled_waiter_that_was_granted_gives_the_slot_back():
    gate = SlotGate(total=1, queues=1)
    await gate.acquire(0)
    waiter = asyncio.create_task(gate.acquire(0))
    await asyncio.sleep(0)
    gate.release(0)  # granted to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert gate.free == 1 and gate.running == [0]


def test_queue_specs_and_bad_arguments():
    assert parse_queue_spec("emails") == ("emails", None)
    assert parse_queue_spec("emails:3") == ("emails", 3)
    for bad in ("emails:0", "emails:x", "emails:1001"):
        with pytest.raises(qo.InvalidInput) as e:
            parse_queue_spec(bad)
        assert e.value.field == "--queue"


async def test_worker_of_several_queues_checks_its_arguments(storage_url):
    a = await qo.connect(storage_url, queue="a")
    b = await qo.connect(storage_url, queue="b")
    try:
        w = qo.Worker([a, b], 4)
        assert isinstance(w, MultiQueueWorker) and [x.queue.name for x in w.workers] == ["a", "b"]
        assert len({x.worker_id for x in w.workers}) == 1
        with pytest.raises(qo.InvalidInput) as e:
            qo.Worker([a, b], 4, weights=[1])
        assert e.value.field == "weights"
        with pytest.raises(qo.InvalidInput) as e:
            qo.Worker([a, a])
        assert e.value.field == "queues"
        with pytest.raises(qo.InvalidInput):
            await qo.Worker([a, b]).run()  # no handlers
    finally:
        await a.close()
        await b.close()


# -- on every backend ------------------------------------------------------------------------


async def _queues(url, *names):
    return [await qo.connect(url, queue=n) for n in names]


async def test_strict_order_runs_the_first_queue_first(storage_url):
    first, second = await _queues(storage_url, "first", "second")
    try:
        for i in range(4):
            await second.submit("job", {"q": "second", "i": i})
            await first.submit("job", {"q": "first", "i": i})
        order: list[str] = []
        w = qo.Worker([first, second], 1, **FAST)

        @w.handler("job")
        async def job(input, ctx):
            order.append(input["q"])
            await asyncio.sleep(0.1)  # the other queue's next candidate is listed meanwhile

        stats = await w.run(until_idle=True)
        assert sorted(order) == ["first"] * 4 + ["second"] * 4 and stats["completed"] == 8
        # the very first slot goes to whichever queue listed first; after that, "first" wins
        assert order[1:].index("second") >= 3 if order[0] == "second" else order[:4] == ["first"] * 4
    finally:
        await first.close()
        await second.close()


async def test_weights_and_the_shared_budget(storage_url):
    a, b = await _queues(storage_url, "a", "b")
    try:
        await a.submit_many([("job", {"q": "a"})] * 12)
        await b.submit_many([("job", {"q": "b"})] * 12)
        running = {"a": 0, "b": 0}
        peak = {"total": 0}
        w = qo.Worker([a, b], 4, weights=[3, 1], **FAST)

        @w.handler("job")
        async def job(input, ctx):
            running[input["q"]] += 1
            peak["total"] = max(peak["total"], sum(running.values()))
            await asyncio.sleep(0.05)
            running[input["q"]] -= 1

        stats = await w.run(until_idle=True)
        assert stats["completed"] == 24 and peak["total"] <= 4  # one budget for both queues
        for q in (a, b):
            assert [t.status async for t in q.list(limit=None)] == ["completed"] * 12
    finally:
        await a.close()
        await b.close()


async def test_until_idle_waits_for_every_queue(storage_url):
    """A task of one queue submits to the other: the worker does not stop in between."""
    a, b = await _queues(storage_url, "a", "b")
    try:
        await a.submit("first")
        w = qo.Worker([a, b], 2, **FAST)

        @w.handler("first")
        async def first(input, ctx):
            await asyncio.sleep(0.3)  # b is idle all this time
            await b.submit("second")

        @w.handler("second")
        async def second(input, ctx):
            return "done"

        stats = await w.run(until_idle=True)
        assert stats["completed"] == 2
        assert [t.output async for t in b.list(limit=None)] == ["done"]
    finally:
        await a.close()
        await b.close()


@pytest.fixture
def mq_job():
    """The @qo.handler the CLI test's module registers, unregistered after the test."""
    from qo.handlers import default_registry

    yield "mq_job"
    default_registry.handlers.pop("mq_job", None)


def test_cli_worker_takes_several_queues(storage_url, tmp_path, mq_job):
    module = tmp_path / "handlers_multi.py"
    module.write_text("import qo\n\n@qo.handler('mq_job')\ndef mq_job(input):\n    return input\n")
    runner = CliRunner()
    cli = build_cli()
    for queue in ("emails", "reports"):
        assert runner.invoke(cli, ["submit", "mq_job", "--input", f'"{queue}"', "--queue", queue,
                                   "--url", storage_url]).exit_code == 0
    r = runner.invoke(cli, ["worker", str(module), "--queue", "emails", "--queue", "reports", "--until-idle",
                            "--url", storage_url, "--poll-max", "0.1"])
    assert r.exit_code == 0, r.output
    assert "queues 'emails', 'reports' (in this order)" in r.stderr and "completed 2" in r.stderr
    for queue in ("emails", "reports"):
        listed = runner.invoke(cli, ["list", "--status", "completed", "--queue", queue, "--json", "--url", storage_url])
        assert listed.stdout.count('"status": "completed"') == 1
    bad = runner.invoke(cli, ["worker", str(module), "--queue", "emails:2", "--queue", "reports", "--url", storage_url])
    assert bad.exit_code == 2 and "give a weight to every queue" in bad.stderr
