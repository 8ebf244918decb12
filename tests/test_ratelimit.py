"""Rate and concurrency limits on both backends, across worker processes, on fast clocks."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import time

import pytest
from click.testing import CliRunner

import qo
from clocks import ticking_queue
from qo.clock import ScaledClock
from qo.counting import CountingStorage

import limit_procs

CTX = multiprocessing.get_context("spawn")
SPEED = 5.0  # the shared clock runs five times faster than real time


def read_log(path) -> list[tuple[str, str, float, float]]:
    rows = []
    for line in path.read_text().split("\n"):
        if line:
            task_id, task_type, start, end, _pid, _claimed = line.split()
            rows.append((task_id, task_type, float(start), float(end)))
    return rows


def read_spans(path) -> list[tuple[float, float]]:
    """(claimed, started) per execution: its token was taken between the two."""
    return [(float(line.split()[5]), float(line.split()[2])) for line in path.read_text().split("\n") if line]


def max_surely_in_window(spans: list[tuple[float, float]], window: float) -> int:
    """The most executions whose token was surely taken within one window: a token is
    taken between the claim and the handler's start, so a span inside the window puts
    its token there, however late a loaded machine started the handler. (Counting
    handler starts instead lets scheduling delays on a busy machine bunch them up.)"""
    return max((sum(1 for s, e in spans if t <= s and e < t + window) for t, _ in spans), default=0)


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def max_overlap(rows) -> int:
    events = sorted([(s, 1) for _, _, s, _ in rows] + [(e, -1) for _, _, _, e in rows])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


async def run_processes(url, queue_name, n, log, hold=0.0, concurrency=4, timeout=240):
    clock_args = (SPEED, 1_900_000_000.0, time.time())
    loop = asyncio.get_running_loop()
    with CTX.Pool(n) as pool:
        jobs = [pool.apply_async(limit_procs.run_limited_worker,
                                 (url, queue_name, clock_args, str(log), hold, concurrency)) for _ in range(n)]
        stats = await loop.run_in_executor(None, lambda: [j.get(timeout=timeout) for j in jobs])
    return stats, ScaledClock(*clock_args)


async def test_four_workers_hold_a_rate_limit_over_every_sliding_second(storage_url, tmp_path):
    clock = ScaledClock(SPEED, 1_900_000_000.0, time.time())
    q = await qo.connect(storage_url, queue="rl", clock=clock)
    # 1 start per 2 clock seconds is 2.5 per real second on the 5x clock: four workers on
    # a loaded machine outrun that many times over (at 5 a second a loaded run once never
    # asked faster than the limit), so the limit, not the machine, sets the pace
    await q.limits.set("task_type:limited", rate=1, per=2.0, burst=2)
    await q.submit_many([("limited", i) for i in range(20)])
    log = tmp_path / "starts.log"
    stats, _ = await run_processes(storage_url, "rl", 4, log)
    rows = read_log(log)
    assert sorted(r[0] for r in rows) == sorted({r[0] for r in rows}) and len(rows) == 20
    starts = [r[2] for r in rows]
    assert max_surely_in_window(read_spans(log), 2.0) <= 3  # rate x 2 s + burst
    assert max(starts) - min(starts) >= (20 - 2) * 2.0 - 2.0  # the rate, not the workers, set the pace
    assert sum(s.get("throttled", 0) for s in stats) > 0
    statuses = collections.Counter([t.status async for t in q.list(limit=None)])
    assert statuses == {"completed": 20}
    assert {t.attempt async for t in q.list(limit=None)} == {1}  # a delay is not an attempt
    await q.close()


async def test_a_concurrency_limit_of_two_holds_under_eight_workers(storage_url, tmp_path):
    q = await qo.connect(storage_url, queue="cc")
    await q.limits.set("task_type:limited", concurrency=2, backpressure="skip")
    await q.submit_many([("limited", i) for i in range(24)])
    log = tmp_path / "runs.log"
    await run_processes(storage_url, "cc", 8, log, hold=0.5, concurrency=2)
    rows = read_log(log)
    assert len(rows) == 24
    assert 1 <= max_overlap(rows) <= 2
    await q.close()


@pytest.fixture
async def ticking(storage_url):
    """A queue whose clock runs at 10x in this process."""
    async with ticking_queue(storage_url, "tick", speed=10.0, start=1_900_000_000.0) as (q, clock):
        yield q, clock


def recording_worker(q, clock, rows, **settings):
    worker = qo.Worker(q, concurrency=4, poll_min=0.02, poll_max=0.1, sweep_interval=1.0, **settings)

    async def handler(input, ctx):
        rows.append((ctx.task.task_type, input, clock.now()))

    for t in ("limited", "free", "a", "b"):
        worker.handler(t)(handler)
    return worker


async def test_per_key_limits_isolate_keys(ticking):
    q, clock = ticking
    await q.limits.set("key:*", rate=2, per=1.0, burst=1)
    await q.submit_many([("a", f"{k}{i}", {"rate_limit_key": k}) for i in range(6) for k in ("x", "y")])
    rows: list = []
    start = clock.now()
    await asyncio.wait_for(recording_worker(q, clock, rows).run(until_idle=True), 60)
    by_key = {k: [t for _, inp, t in rows if inp.startswith(k)] for k in ("x", "y")}
    for k, times in by_key.items():
        assert len(times) == 6
        assert max_in_window(times, 1.0) <= 3  # 2/s x 1 s + burst 1
        assert max(times) - start >= 2.0  # (6 - 1) / 2 s for each key
    # isolated: both keys progress side by side, not one after the other (each key's
    # first run comes before the other's last), each in a bucket of its own (below).
    # (Their last runs were compared within 1.5 s: on a clock ticking 10x over real S3
    # requests they drift apart by up to 2.3 s, which failed one run in ten.)
    assert min(by_key["y"]) < max(by_key["x"]) and min(by_key["x"]) < max(by_key["y"])
    rows_limits = {r["scope"]: r for r in await q.limits.list()}
    assert rows_limits["key:*"]["buckets"] == 2


async def test_a_global_limit_covers_every_type(ticking):
    q, clock = ticking
    await q.limits.set("global", rate=4, per=1.0, burst=2)
    await q.submit_many([("a", i) for i in range(8)] + [("b", i) for i in range(8)])
    rows: list = []
    await asyncio.wait_for(recording_worker(q, clock, rows).run(until_idle=True), 60)
    assert len(rows) == 16
    assert max_in_window([t for *_, t in rows], 1.0) <= 6


async def test_other_types_keep_flowing_while_one_is_throttled(ticking):
    q, clock = ticking
    await q.limits.set("task_type:limited", rate=1, per=1.0, burst=1)
    await q.submit_many([("limited", i) for i in range(6)])
    await q.submit_many([("free", i) for i in range(30)])
    rows: list = []
    start = clock.now()
    await asyncio.wait_for(recording_worker(q, clock, rows).run(until_idle=True), 60)
    free_done = max(t for typ, _, t in rows if typ == "free")
    limited = sorted(t for typ, _, t in rows if typ == "limited")
    assert len(limited) == 6 and limited[-1] - start >= 5 - 0.1
    assert free_done < limited[-1] - 2  # the free tasks did not wait for the limited ones


@pytest.mark.parametrize("mode", ["wait", "skip"])
async def test_wait_and_skip_backpressure_hold_the_rate(ticking, mode):
    q, clock = ticking
    await q.limits.set("task_type:limited", rate=2, per=1.0, burst=1, backpressure=mode)
    tasks = await q.submit_many([("limited", i) for i in range(6)])
    rows: list = []
    await asyncio.wait_for(recording_worker(q, clock, rows).run(until_idle=True), 60)
    assert len(rows) == 6 and max_in_window([t for *_, t in rows], 1.0) <= 3
    for t in tasks:
        got = await q.get(t.id)
        assert got.attempt == 1
        if mode == "skip":  # skip never rewrites the task (wait delays what it cannot wait for)
            assert got.available_at == t.available_at


async def test_limit_validation_names_the_field_and_writes_nothing(queue):
    for kwargs, field in [
        (dict(scope="everything", rate=1), "scope"),
        (dict(scope="task_type:a/b", rate=1), "scope"),
        (dict(scope="global", rate=0), "rate"),
        (dict(scope="global", rate=float("nan")), "rate"),
        (dict(scope="global"), "rate"),
        (dict(scope="global", rate=1, per=-1), "per"),
        (dict(scope="global", rate=1, burst=0.5), "burst"),
        (dict(scope="global", concurrency=0), "concurrency"),
        (dict(scope="global", rate=1, backpressure="drop"), "backpressure"),
    ]:
        with pytest.raises(qo.InvalidInput) as err:
            await queue.limits.set(**kwargs)
        assert err.value.field == field
    with pytest.raises(qo.InvalidInput) as err:
        await queue.submit("a", None, rate_limit_key="")
    assert err.value.field == "rate_limit_key"
    assert await queue.storage.list(f"{queue.name}/") == []


async def test_tokens_are_taken_in_batches_at_high_rates(storage_url):
    q = await qo.connect(storage_url, queue="batch", wrap_storage=CountingStorage)
    await q.limits.set("task_type:a", rate=1000, per=1.0, burst=1000)
    limiter = qo.Worker(q).limiter
    await limiter.refresh(force=True)
    task = q.build_task("a", None)
    q.storage.reset()
    for _ in range(100):
        assert (await limiter.acquire(task)).granted
    writes = q.storage.counts().get("PUT_COND", 0) + q.storage.counts().get("PUT", 0)
    assert writes <= 3  # one CAS per batch of min(rate x 0.25 s, burst / 10) = 100 tokens
    await q.close()


def test_cli_limits(storage_url):
    from qo.cli import cli

    runner = CliRunner()
    ok = runner.invoke(cli, ["limit", "set", "task_type:email", "--rate", "10/m", "--concurrency", "3",
                             "--url", storage_url])
    assert ok.exit_code == 0 and "10 per 60s" in ok.output and "at most 3 running" in ok.output
    listed = runner.invoke(cli, ["limit", "list", "--url", storage_url])
    assert "task_type:email" in listed.output and "tokens 10" in listed.output and "running 0/3" in listed.output
    bad = runner.invoke(cli, ["limit", "set", "task_type:email", "--rate", "ten", "--url", storage_url])
    assert bad.exit_code == 1 and "--rate" in bad.output
    submitted = runner.invoke(cli, ["submit", "email", "--rate-limit-key", "cust-1", "--json", "--url", storage_url])
    assert '"rate_limit_key": "cust-1"' in submitted.output
    removed = runner.invoke(cli, ["limit", "remove", "task_type:email", "--url", storage_url])
    assert removed.exit_code == 0
    assert runner.invoke(cli, ["limit", "remove", "task_type:email", "--url", storage_url]).exit_code == 1
