"""Task expiry (issue 16, item 5): ``submit(..., expires_at=...)``, ``qo submit --expires-in``.

A task no worker has started by its ``expires_at`` ends ``expired`` (terminal) instead
of running: its ended/ index marker is written, its dependents follow their policy, and
it takes no rate-limit token. Every test runs on local, S3 and Azure; time is a ticking
fake clock (tests/clocks.py) so "an hour later" costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

import qo
from clocks import ticking_queue
from qo import keys
from qo.cli import build_cli
from qo.clock import FakeClock, utc
from qo.errors import InvalidInput, StorageUnavailable
from qo.worker import Worker


def _handlers(worker: Worker, ran: list[str], *types: str) -> None:
    """Register a handler for each type that records the id of every task it ran."""
    for task_type in types:
        @worker.handler(task_type)
        async def handler(input, ctx):
            ran.append(ctx.task.id)
            return "done"


async def _drain(worker: Worker, timeout: float = 30.0):
    return await asyncio.wait_for(worker.run(until_idle=True), timeout)


async def _listed(q: qo.Queue, prefix: str) -> list[str]:
    return [e.key for e in await q.storage.list(prefix)]


# -- the worker side --------------------------------------------------------------------


async def test_a_task_past_its_expiry_ends_expired_without_running(storage_url, fast_settings, events):
    async with ticking_queue(storage_url, "exp") as (q, clock):
        deadline = clock.now() + 60
        task = await q.submit("t", {"x": 1}, expires_at=utc(deadline))
        assert task.expires_at == pytest.approx(deadline, abs=0.001)
        clock.advance(120)  # no worker looked at it in time
        worker = Worker(q, settings=fast_settings)
        ran: list[str] = []
        _handlers(worker, ran, "t")
        stats = await _drain(worker)

        done = await q.get(task.id)
        assert ran == []
        assert done.status == "expired" and done.is_terminal
        assert done.finished_at is not None and done.finished_at >= task.expires_at
        assert done.attempt == 0 and done.lease_id is None and done.worker_id is None and done.started_at is None
        assert done.last_error["type"] == "Expired" and "expires_at" in done.last_error["message"]
        assert stats["expired"] == 1 and stats["claimed"] == 0
        assert events.of(task.id) == ["submitted", "expired"]
        # the ended/ index names it; no ready marker and no worker record are left
        assert await _listed(q, keys.ended_prefix(q.name, "expired")) == [done.ended_key(q.name)]
        assert await _listed(q, keys.ready_prefix(q.name)) == []
        assert await _listed(q, f"{q.name}/workers/") == []
        assert done.public_dict()["expires_at"].startswith(utc(task.expires_at).strftime("%Y-%m-%dT%H:%M"))


async def test_dependents_of_an_expired_task_follow_their_policy(storage_url, fast_settings, events):
    async with ticking_queue(storage_url, "expdeps") as (q, clock):
        parent = await q.submit("parent", None, expires_at=utc(clock.now() + 60))
        children = {policy: await q.submit("child", {"p": policy}, depends_on=[parent.id],
                                           on_dependency_failure=policy)
                    for policy in ("fail", "skip", "run")}
        assert all(c.status == "blocked" for c in children.values())
        clock.advance(120)
        worker = Worker(q, settings=fast_settings)
        ran: list[str] = []
        _handlers(worker, ran, "parent", "child")
        await _drain(worker)

        assert (await q.get(parent.id)).status == "expired"
        got = {policy: await q.get(c.id) for policy, c in children.items()}
        assert got["fail"].status == "failed"
        assert got["skip"].status == "skipped"
        assert got["run"].status == "completed"
        assert ran == [children["run"].id]  # the parent never ran; only the "run" child did
        assert "expired" in got["fail"].last_error["message"]


async def test_a_task_claimed_before_its_expiry_runs_to_completion(storage_url, fast_settings, events):
    async with ticking_queue(storage_url, "exprun") as (q, clock):
        task = await q.submit("slow", None, expires_at=utc(clock.now() + 20))
        worker = Worker(q, settings=fast_settings)

        @worker.handler("slow")
        async def slow(input, ctx):
            clock.advance(60)  # the attempt ends well after expires_at: it was started in time
            return "finished late"

        stats = await _drain(worker)
        done = await q.get(task.id)
        assert done.status == "completed" and done.output == "finished late"
        assert done.finished_at > done.expires_at > done.started_at
        assert stats["expired"] == 0
        assert events.of(task.id) == ["submitted", "started", "succeeded"]
        assert await _listed(q, keys.ended_prefix(q.name)) == []


async def test_a_delayed_task_due_after_its_expiry_expires(storage_url, fast_settings):
    async with ticking_queue(storage_url, "expdelay") as (q, clock):
        now = clock.now()
        late = await q.submit("t", None, schedule_at=utc(now + 10), expires_at=utc(now + 20))
        in_time = await q.submit("t", None, schedule_at=utc(now + 10), expires_at=utc(now + 10_000))
        assert (await _listed(q, keys.delayed_prefix(q.name))) and not await _listed(q, keys.ready_prefix(q.name))
        clock.advance(30)  # both due now; one of them is past its expiry
        worker = Worker(q, settings=fast_settings)
        ran: list[str] = []
        _handlers(worker, ran, "t")
        await _drain(worker)

        assert (await q.get(late.id)).status == "expired"
        assert (await q.get(in_time.id)).status == "completed"
        assert ran == [in_time.id]
        assert await _listed(q, keys.delayed_prefix(q.name)) == []


async def test_an_expired_task_takes_no_rate_limit_token(storage_url, fast_settings):
    async with ticking_queue(storage_url, "exprate") as (q, clock):
        # one token, and the next one an hour away: if the expired task took it, the good
        # one would wait an hour (and the drain below would time out)
        await q.limits.set("task_type:t", rate=1, per=3600.0, burst=1)
        doomed = await q.submit("t", None, priority=250, expires_at=utc(clock.now() + 5))
        good = await q.submit("t", None, priority=10)
        clock.advance(10)
        worker = Worker(q, settings=fast_settings, concurrency=1)
        ran: list[str] = []
        _handlers(worker, ran, "t")
        stats = await _drain(worker, timeout=20)

        assert (await q.get(doomed.id)).status == "expired"
        assert (await q.get(good.id)).status == "completed"
        assert ran == [good.id]
        assert stats["throttled"] == 0


async def test_retry_of_an_expired_task_gives_it_a_fresh_chance(storage_url, fast_settings, events):
    async with ticking_queue(storage_url, "expretry") as (q, clock):
        task = await q.submit("t", None, expires_at=utc(clock.now() + 5))
        clock.advance(10)
        worker = Worker(q, settings=fast_settings)
        ran: list[str] = []
        _handlers(worker, ran, "t")
        await _drain(worker)
        assert (await q.get(task.id)).status == "expired"

        revived = await q.retry(task.id)
        assert revived.status == "pending" and revived.expires_at is None and revived.attempt == 0
        assert revived.finished_at is None
        stored = await q.get(task.id)
        assert stored.status == "pending" and stored.expires_at is None
        clock.advance(3600)
        await _drain(worker)
        assert (await q.get(task.id)).status == "completed"
        assert ran == [task.id]


async def test_expires_at_none_means_never(storage_url, fast_settings):
    async with ticking_queue(storage_url, "expnever") as (q, clock):
        task = await q.submit("t", None, expires_at=None)
        assert task.expires_at is None
        clock.advance(10 * 365 * 86400)
        worker = Worker(q, settings=fast_settings)
        ran: list[str] = []
        _handlers(worker, ran, "t")
        await _drain(worker)
        assert (await q.get(task.id)).status == "completed" and ran == [task.id]


class EndedBlocked:
    """A Storage wrapper whose writes under ``ended/`` fail (StorageUnavailable) while
    ``blocked`` is set: an outage met exactly between an expiry's CAS and its marker."""

    def __init__(self, inner):
        self.inner, self.blocked, self.refused = inner, True, 0

    name = property(lambda self: self.inner.name)
    clock_offset = property(lambda self: float(getattr(self.inner, "clock_offset", 0.0) or 0.0))

    async def get(self, key):
        return await self.inner.get(key)

    async def put(self, key, data, *, if_match=None, if_none_match=False):
        if self.blocked and "/ended/" in key:
            self.refused += 1
            raise StorageUnavailable("injected: ended/ is down", backend=self.inner.name, key=key)
        return await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)

    async def delete(self, key, *, if_match=None):
        return await self.inner.delete(key, if_match=if_match)

    async def list(self, prefix, *, start_after=None, limit=1000):
        return await self.inner.list(prefix, start_after=start_after, limit=limit)

    async def close(self):
        await self.inner.close()


@pytest.mark.parametrize("forced", [False, True], ids=["outage-ends", "forced-exit"])
async def test_the_record_names_an_expired_task_until_its_ended_marker_is_stored(storage_url, fast_settings,
                                                                                   events, forced):
    """The expiry CAS landed, the ended/ marker write keeps failing: the worker retries
    it through the outage and its record keeps naming the task meanwhile; the event
    comes once it is stored. A forced exit in between leaves the task named in the
    record it leaves behind, for recovery to repair the marker."""
    clock = FakeClock(1_800_000_000.0)
    wrapped: list[EndedBlocked] = []
    q = await qo.connect(storage_url, queue="expout", clock=clock,
                         wrap_storage=lambda s: wrapped.append(EndedBlocked(s)) or wrapped[0])
    ticker = asyncio.create_task(_tick(clock))
    try:
        task = await q.submit("t", None, expires_at=utc(clock.now() + 5))
        clock.advance(10)
        worker = Worker(q, settings=fast_settings)
        ran: list[str] = []
        _handlers(worker, ran, "t")
        run = asyncio.create_task(_drain(worker))
        for _ in range(400):
            if (await q.get(task.id)).status == "expired" and wrapped[0].refused >= 2:
                break
            await asyncio.sleep(0.01)
        assert (await q.get(task.id)).status == "expired" and wrapped[0].refused >= 2
        record = json.loads((await q.storage.get(keys.worker(q.name, worker.worker_id))).data)
        assert task.id in record["leases"]
        assert events.of(task.id) == ["submitted"] and not run.done()
        if forced:
            worker.force()
            await run
            record = json.loads((await q.storage.get(keys.worker(q.name, worker.worker_id))).data)
            assert task.id in record["leases"]
            assert await _listed(q, keys.ended_prefix(q.name)) == []
            assert events.of(task.id) == ["submitted"]
            return
        wrapped[0].blocked = False
        stats = await run
        assert stats["expired"] == 1 and ran == []
        assert events.of(task.id) == ["submitted", "expired"]
        done = await q.get(task.id)
        assert await _listed(q, keys.ended_prefix(q.name, "expired")) == [done.ended_key(q.name)]
        assert await _listed(q, f"{q.name}/workers/") == []
    finally:
        ticker.cancel()
        await q.close()


async def _tick(clock: FakeClock, speed: float = 10.0) -> None:
    while True:
        await asyncio.sleep(0.005)
        clock.advance(0.005 * speed)


# -- bad input ----------------------------------------------------------------------------


async def test_bad_expires_at_is_refused_before_anything_is_written(queue):
    now = datetime.now(timezone.utc)
    later = now + timedelta(hours=1)
    cases = [
        dict(expires_at=datetime(2030, 1, 1)),  # naive
        dict(expires_at=now - timedelta(seconds=5)),  # in the past
        dict(expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc)),
        dict(expires_at=later, schedule_at=later + timedelta(minutes=1)),  # before it could start
        dict(expires_at=later, schedule_at=later),  # the moment it becomes due
        dict(expires_at="2030-01-01T00:00:00Z"),  # a string
        dict(expires_at=1_900_000_000),  # epoch seconds are not a datetime
        dict(expires_at=later.date()),
    ]
    for options in cases:
        with pytest.raises(InvalidInput) as err:
            await queue.submit("t", None, **options)
        assert err.value.field == "expires_at", options
        with pytest.raises(InvalidInput) as err:
            await queue.submit_many([("t", None), ("t", None, options)])
        assert err.value.field == "items[1].expires_at", options
        with pytest.raises(InvalidInput) as err:
            await queue.submit_graph({"a": {"task_type": "t"}, "b": {"task_type": "t", "depends_on": ["a"],
                                                                   **options}})
        assert err.value.field == "nodes[b].expires_at", options
    assert await _listed(queue, f"{queue.name}/") == []


async def test_expires_at_passes_through_every_submit_path(queue):
    deadline = datetime.now(timezone.utc) + timedelta(hours=2)
    one = await queue.submit("t", None, expires_at=deadline)
    many = await queue.submit_many([("t", None, {"expires_at": deadline}), ("t", None)])
    graph = await queue.submit_graph({"a": {"task_type": "t", "expires_at": deadline},
                                      "b": {"task_type": "t", "depends_on": ["a"], "expires_at": deadline}})
    for task in (one, many[0], graph["a"], graph["b"]):
        assert (await queue.get(task.id)).expires_at == pytest.approx(deadline.timestamp())
    assert (await queue.get(many[1].id)).expires_at is None


# -- the command line --------------------------------------------------------------------


def _cli(*args: str):
    result = CliRunner().invoke(build_cli(), list(args))
    return result, result.output + (getattr(result, "stderr", "") or "")


def _stored(url: str, task_id: str) -> qo.Task:
    async def go():
        async with await qo.connect(url, queue="default") as q:
            return await q.get(task_id)

    return asyncio.run(go())


def test_cli_expires_in_and_expires_at(storage_url):
    before = time.time()
    result, out = _cli("submit", "t", "--expires-in", "10m", "--url", storage_url)
    assert result.exit_code == 0, out
    task = _stored(storage_url, result.stdout.strip())
    assert before + 600 - 5 <= task.expires_at <= time.time() + 600 + 5

    at = (datetime.now(timezone.utc) + timedelta(days=1)).replace(microsecond=0)
    result, out = _cli("submit", "t", "--expires-at", at.isoformat(), "--json", "--url", storage_url)
    assert result.exit_code == 0, out
    shown = json.loads(result.stdout)
    assert datetime.fromisoformat(shown["expires_at"]) == at
    assert _stored(storage_url, shown["id"]).expires_at == at.timestamp()

    result, out = _cli("status", shown["id"], "--url", storage_url)
    assert result.exit_code == 0 and "expires:" in out

    for bad in ("-5m", "garbage", "0", "", "1e400"):
        result, out = _cli("submit", "t", "--expires-in", bad, "--url", storage_url)
        assert result.exit_code == 1 and "--expires-in" in out, (bad, out)
    for bad in ("2000-01-01T00:00:00Z", "2030-01-01T00:00:00", "soon"):
        result, out = _cli("submit", "t", "--expires-at", bad, "--url", storage_url)
        assert result.exit_code == 1 and "--expires-at" in out, (bad, out)
    # due later than it expires: refused, naming the option typed
    result, out = _cli("submit", "t", "--delay", "1h", "--expires-in", "10m", "--url", storage_url)
    assert result.exit_code == 1 and "--expires-in" in out and "schedule_at" in out, out
    result, out = _cli("submit", "t", "--expires-in", "10m", "--expires-at", at.isoformat(), "--url", storage_url)
    assert result.exit_code == 2 and "--expires-in and --expires-at" in out, out

    async def count():
        async with await qo.connect(storage_url, queue="default") as q:
            return len([t async for t in q.list(limit=None)])

    assert asyncio.run(count()) == 2  # only the two good submits wrote anything


def test_cli_submit_graph_takes_iso_times(storage_url):
    at = (datetime.now(timezone.utc) + timedelta(hours=3)).replace(microsecond=0)
    graph = {"a": {"task_type": "t", "expires_at": at.isoformat()}}
    result, out = _cli("submit-graph", json.dumps(graph), "--json", "--url", storage_url)
    assert result.exit_code == 0, out
    assert _stored(storage_url, json.loads(result.stdout)["a"]["id"]).expires_at == at.timestamp()
    graph = {"a": {"task_type": "t", "expires_at": "2030-01-01T00:00:00"}}
    result, out = _cli("submit-graph", json.dumps(graph), "--url", storage_url)
    assert result.exit_code == 1 and "nodes[a].expires_at" in out, out
