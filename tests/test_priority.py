"""Priorities and aging (issue #6), storage-facing tests on local and on S3 (moto).

- due tasks start by priority, then oldest first (300 tasks, one slot);
- aging: under a flood of priority-255 work a priority-0 task starts within the bound
  documented in docs/architecture.md (fake clock), and waits while aging is off;
- an aging pass costs requests for the markers it moves, not for the queue;
- retries re-enter at the task's own priority; invalid priorities write nothing;
- ``qo status`` / ``qo list`` show the effective priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import qo
from clocks import ticking_queue
from qo import keys
from qo.aging import (
    AgingSettings,
    ReadyEntry,
    age_ready,
    effective_priority,
    task_effective_priority,
    to_aging_settings,
)
from qo.cli import build_cli
from qo.clock import FakeClock
from qo.counting import CountingStorage
from qo.model import PRIORITY_LEVELS, check_priority
from qo.plugins import Plugins, get_plugins
from qo.policies.priority import aged_priority
from qo.worker import Worker, WorkerSettings

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)

#: the flood tests: a slot runs a task for TASK_SECONDS, a producer adds a priority-255
#: task every TASK_SECONDS / 2 (twice what the worker drains)
TASK_SECONDS = 0.2
FLOOD_AGING = AgingSettings(step_seconds=0.5, step_levels=64, interval=0.1)  # cap after 4 x 0.5 s
FLOOD_BUFFER_AGE = 0.25
#: a few storage round trips (one pass, one LIST, one claim) on the fake clock
ROUND_TRIPS = 0.5


@pytest.fixture(autouse=True)
def _no_aging_environment(monkeypatch):
    for name in ("QO_AGING", "QO_AGING_STEP_SECONDS", "QO_AGING_STEP_LEVELS", "QO_AGING_CAP", "QO_AGING_INTERVAL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def clocked(storage_url):
    """A queue on a fake clock that a background task moves 2x faster than real time
    (slow enough that moto's round trips stay small against the test's seconds)."""
    async with ticking_queue(storage_url, "prio", speed=2.0) as (q, clock):
        yield q, clock


async def ready_keys(q) -> list[str]:
    return [e.key for e in await q.storage.list(keys.ready_prefix(q.name))]


async def wait_until(predicate, *, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (async) every 10 ms of real time until true, or fail."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- priority values ---------------------------------------------------------------


def test_level_names_and_integers_are_priorities():
    assert PRIORITY_LEVELS == {"critical": 255, "high": 192, "normal": 128, "low": 64, "background": 0}
    for name, value in PRIORITY_LEVELS.items():
        assert check_priority(name) == value
        assert check_priority(f"  {name.upper()} ") == value
    assert [check_priority(v) for v in (0, 1, 128, 255, "0", "255", " 17 ")] == [0, 1, 128, 255, 0, 255, 17]


BAD_PRIORITIES = [300, 256, -1, "urgent", True, False, 1.5, "12.5", "", None, [1]]


@pytest.mark.parametrize("bad", BAD_PRIORITIES)
def test_an_invalid_priority_names_the_field(bad):
    with pytest.raises(qo.InvalidInput) as exc:
        check_priority(bad)
    assert exc.value.field == "priority"


async def test_invalid_priorities_are_rejected_before_anything_is_written(queue):
    for bad in [b for b in BAD_PRIORITIES if b is not None]:  # None: the queue's default
        with pytest.raises(qo.InvalidInput) as exc:
            await queue.submit("t", {"x": 1}, priority=bad)
        assert exc.value.field == "priority"
        with pytest.raises(qo.InvalidInput) as exc:
            await queue.submit("t", None, priority=bad, idempotency_key="k-1")
        assert exc.value.field == "priority"
        with pytest.raises(qo.InvalidInput) as exc:
            await queue.submit_many([("t", 1, {"priority": "high"}), ("t", 2, {"priority": bad})])
        assert exc.value.field == "items[1].priority"
    assert await queue.storage.list("") == []  # not a marker, task or idempotency record


def test_the_cli_rejects_an_invalid_priority_before_writing(storage_url):
    for bad in ("300", "-1", "urgent", "1.5"):
        result = CliRunner().invoke(build_cli(), ["submit", "t", "--priority", bad, "--url", storage_url])
        assert result.exit_code == 1 and "priority" in result.stderr
    ok = CliRunner().invoke(build_cli(), ["submit", "t", "--priority", "Background", "--url", storage_url, "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["priority"] == 0

    async def count() -> int:
        async with await qo.connect(storage_url) as q:
            return len(await q.storage.list(""))

    assert asyncio.run(count()) == 2  # the one valid task: its marker and itself


# -- start order -------------------------------------------------------------------


async def test_due_tasks_start_by_priority_then_oldest_first(queue):
    """300 tasks of a fixed random mix of levels (names and numbers, duplicates),
    submitted while no worker runs; one worker, one slot."""
    rng = random.Random(6)
    mix = [0, "background", 1, "low", 100, 127, "normal", 128, 129, "high", 254, "critical", 255]
    given_priorities = [rng.choice(mix) for _ in range(300)]
    tasks = await queue.submit_many([("job", {"i": i}, {"priority": p}) for i, p in enumerate(given_priorities)])
    priority = [t.priority for t in tasks]
    assert len(set(priority)) == 10 and priority.count(255) > 20

    worker = Worker(queue, concurrency=1, aging=False, **FAST)
    order: list[int] = []

    @worker.handler("job")
    async def job(input: dict, ctx: Any) -> None:
        order.append(input["i"])

    await worker.run(until_idle=True)
    assert sorted(order) == list(range(300))  # each started once
    started = [priority[i] for i in order]
    assert all(a >= b for a, b in zip(started, started[1:])), "start order is not non-increasing in priority"
    for level in set(priority):  # FIFO within a level: submission order
        within = [i for i in order if priority[i] == level]
        assert within == sorted(within), f"level {level} did not start in submission order"


async def test_slots_take_the_listing_in_priority_order(queue):
    """With several slots, tasks are handed out in index order: the first C to start are
    the C most urgent."""
    low = await queue.submit_many([("job", {"p": 10}, {"priority": 10}) for _ in range(20)])
    high = await queue.submit_many([("job", {"p": 200}, {"priority": 200}) for _ in range(4)])
    assert low and high
    worker = Worker(queue, concurrency=4, aging=False, **FAST)
    first: list[int] = []
    gate = asyncio.Event()

    @worker.handler("job")
    async def job(input: dict, ctx: Any) -> None:
        first.append(input["p"])
        if len(first) == 4:
            gate.set()
        await gate.wait()

    await worker.run(until_idle=True)
    assert first[:4] == [200] * 4 and first[4:] == [10] * 20


# -- the default policy ------------------------------------------------------------


def test_the_default_policy_raises_a_floor_up_to_the_cap():
    d = AgingSettings()
    assert (d.enabled, d.step_seconds, d.step_levels, d.cap, d.interval) == (True, 60.0, 32, 255, 10.0)

    def f(level: int, waited: float, s: AgingSettings = d) -> int:
        return aged_priority(level, waited, s.step_seconds, s.step_levels, s.cap)

    assert [f(0, w) for w in (0, 59.9, 60, 119, 120, 300, 479.9, 480, 10**9)] == [0, 0, 32, 32, 64, 160, 224, 255, 255]
    assert f(200, 300) == 200 and f(200, 420) == 224  # fresh and high: keeps its own priority
    capped = AgingSettings(cap=192)
    assert f(0, 10**9, capped) == 192 and f(250, 10**9, capped) == 250  # never lowers
    assert d.time_to_cap() == 480 and d.time_to_cap(255) == 0 and capped.time_to_cap() == 6 * 60
    assert AgingSettings(enabled=False).time_to_cap() == float("inf")
    # the documented bound at the defaults: 480 s + 15 s (pass gap, 1 worker) + 2 s listing age
    assert d.start_bound(0) == 497 and d.start_bound(0, workers=4) == 480 + 60 + 2


@given(level=st.integers(0, 255), w1=st.floats(0, 10_000), w2=st.floats(0, 10_000),
       step=st.floats(0.01, 1000), levels=st.integers(1, 255), cap=st.integers(0, 255))
def test_the_default_policy_is_monotone_and_can_be_reapplied(level, w1, w2, step, levels, cap):
    """The pass sees only a marker's current level: applying the policy to an earlier
    result must give what applying it to the task's own priority gives."""
    w1, w2 = min(w1, w2), max(w1, w2)
    once = aged_priority(level, w2, step, levels, cap)
    assert aged_priority(aged_priority(level, w1, step, levels, cap), w2, step, levels, cap) == once
    assert level <= aged_priority(level, w1, step, levels, cap) <= once <= 255


@given(step=st.floats(0.01, 1000), levels=st.integers(1, 255), cap=st.integers(1, 255))
def test_time_to_cap_is_when_the_policy_reaches_the_cap(step, levels, cap):
    s = AgingSettings(step_seconds=step, step_levels=levels, cap=cap)
    t = s.time_to_cap(0)
    assert aged_priority(0, t * (1 + 1e-9) + 1e-9, step, levels, cap) == cap
    assert aged_priority(0, t * (1 - 1e-9) - 1e-9, step, levels, cap) < cap


def test_aging_settings_are_validated_and_name_the_field(monkeypatch):
    for field, value in (("step_seconds", 0), ("step_seconds", float("nan")), ("step_levels", 0),
                         ("step_levels", 256), ("step_levels", True), ("cap", -1), ("cap", 1.5),
                         ("interval", "10"), ("enabled", "yes")):
        with pytest.raises(qo.InvalidInput) as exc:
            AgingSettings(**{field: value})
        assert exc.value.field == f"aging.{field}"
    assert AgingSettings.from_env({"QO_AGING": "off"}).enabled is False
    assert AgingSettings.from_env({"QO_AGING": " On "}).enabled is True
    assert AgingSettings.from_env({"QO_AGING_STEP_SECONDS": "2.5", "QO_AGING_STEP_LEVELS": "64",
                                   "QO_AGING_CAP": "200", "QO_AGING_INTERVAL": "1"}) == \
        AgingSettings(step_seconds=2.5, step_levels=64, cap=200, interval=1.0)
    for env, field in (({"QO_AGING": "maybe"}, "QO_AGING"), ({"QO_AGING_CAP": "300"}, "QO_AGING_CAP"),
                       ({"QO_AGING_STEP_SECONDS": "soon"}, "QO_AGING_STEP_SECONDS"),
                       ({"QO_AGING_STEP_LEVELS": "1.5"}, "QO_AGING_STEP_LEVELS")):
        with pytest.raises(qo.InvalidInput) as exc:
            AgingSettings.from_env(env)
        assert exc.value.field == field
    # WorkerSettings.aging: an AgingSettings, or True/False over the environment
    assert WorkerSettings().aging == AgingSettings()
    assert WorkerSettings(aging=False).aging.enabled is False
    assert to_aging_settings(FLOOD_AGING) is FLOOD_AGING
    with pytest.raises(qo.InvalidInput) as exc:
        WorkerSettings(aging="on")
    assert exc.value.field == "aging"
    monkeypatch.setenv("QO_AGING", "off")
    assert WorkerSettings().aging.enabled is False
    assert WorkerSettings(aging=True).aging.enabled is True


# -- the aging pass ----------------------------------------------------------------


async def put_markers(q, n: int, priority: int, due: float, task_type: str = "t") -> list[str]:
    """Ready markers without tasks: the pass never reads tasks, so this is all it sees."""
    made = [keys.ready(q.name, priority, due, keys.new_task_id(), task_type) for _ in range(n)]
    await asyncio.gather(*(q.store.put_marker(k) for k in made))
    return made


def moved(key: str, q, priority: int) -> str:
    m = keys.parse_marker(key)
    return keys.ready(q.name, priority, m.due, m.task_id, m.task_type)


async def test_an_aging_pass_moves_markers_in_jumps_and_costs_one_list_on_a_small_queue(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="age", clock=clock, wrap_storage=CountingStorage)
    counter = q.storage
    t0 = clock.now()
    old = await put_markers(q, 10, 0, t0)                 # waited 300 s at the pass: floor 160
    young = await put_markers(q, 150, 0, t0 + 250)        # waited 50 s: floor 0, stays
    normal = await put_markers(q, 120, 128, t0 + 250)     # stays
    high = await put_markers(q, 5, 200, t0)               # old, but above the floor: stays
    top = await put_markers(q, 3, 255, t0)                # at the cap: never moved
    clock.set(t0 + 300)
    counter.reset()

    result = await age_ready(q.store, q.plugins, AgingSettings(), clock.now())
    # the head LIST (1000 keys) holds the whole index: it is the whole scan. 0 -> 160 is a
    # jump of at least half the way to the cap: one PUT per moved marker, one DeleteObjects.
    assert counter.counts() == {"LIST": 1, "PUT": 10, "DELETE_BATCH": 1}
    assert (result.moved, result.lists, result.more, result.cursor) == (10, 1, False, None)
    after = set(await ready_keys(q))
    assert after == {moved(k, q, 160) for k in old} | set(young) | set(normal) | set(high) | set(top)

    counter.reset()  # a second pass right after: nothing is old enough to move further
    again = await age_ready(q.store, q.plugins, AgingSettings(), clock.now())
    assert again.moved == 0 and counter.counts() == {"LIST": 1}

    clock.set(t0 + 479)  # old: 160 -> 224 and young: 0 -> 96 are short of a jump: nothing moves
    assert (await age_ready(q.store, q.plugins, AgingSettings(), clock.now())).moved == 0
    clock.set(t0 + 480)  # old and high reach the cap
    counter.reset()
    capped = await age_ready(q.store, q.plugins, AgingSettings(), clock.now())
    assert capped.moved == 15 and counter.counts() == {"LIST": 1, "PUT": 15, "DELETE_BATCH": 1}
    clock.set(t0 + 490)  # young waited 240 s: floor 128, a jump from 0; normal stays at 128
    # (a head window of 1000 keys: with the default 128, only those landing among the
    # first 128 keys move, the rest once workers have claimed some of those)
    first = await age_ready(q.store, q.plugins, AgingSettings(), clock.now(), head=1000)
    assert (first.moved, first.more) == (100, True)  # at most MAX_MOVES per pass
    assert (await age_ready(q.store, q.plugins, AgingSettings(), clock.now(), head=1000)).moved == 50
    after = set(await ready_keys(q))
    assert after == ({moved(k, q, 255) for k in old + high} | {moved(k, q, 128) for k in young}
                     | set(normal) | set(top))
    await q.close()


async def test_concurrent_passes_agree_and_never_lose_a_marker(storage_url):
    clock = FakeClock()
    a = await qo.connect(storage_url, queue="age2", clock=clock)
    b = await qo.connect(storage_url, queue="age2", clock=clock)
    old = await put_markers(a, 60, 0, clock.now())
    clock.advance(250)  # floor 128: a jump
    await asyncio.gather(*(age_ready(q.store, q.plugins, AgingSettings(), clock.now(), page=7, head=1000)
                           for q in (a, b)))
    assert sorted(await ready_keys(a)) == sorted(moved(k, a, 128) for k in old)
    await a.close()
    await b.close()


async def test_a_pass_stops_after_max_moves_and_the_next_pass_continues(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="age3", clock=clock)
    old = await put_markers(q, 25, 0, clock.now())
    clock.advance(241)  # floor 128
    first = await age_ready(q.store, q.plugins, AgingSettings(), clock.now(), page=10, max_moves=20)
    assert (first.moved, first.more) == (20, True)
    second = await age_ready(q.store, q.plugins, AgingSettings(), clock.now(), page=10, max_moves=20)
    assert (second.moved, second.more) == (5, False)
    assert sorted(await ready_keys(q)) == sorted(moved(k, q, 128) for k in old)
    await q.close()


async def test_the_policy_is_a_plugin(storage_url):
    """A later-registered plugin overrides the default; a wrong answer is an error and
    moves nothing; without any policy plugin (QO_DISABLE_PLUGINS=priority) nothing ages."""
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="age4", clock=clock)
    old = await put_markers(q, 3, 10, clock.now())
    clock.advance(1)  # too young for the default policy

    class Urgent:
        @qo.hookimpl
        def qo_effective_priority(self, task, waited_s):
            return 250 if waited_s >= 1 else None

    class Broken:
        @qo.hookimpl
        def qo_effective_priority(self, task, waited_s):
            return 999

    plugins = get_plugins()
    plugins.register(Broken(), name="test-broken-priority")
    try:
        with pytest.raises(qo.PluginError, match="999"):
            await age_ready(q.store, plugins, AgingSettings(), clock.now())
    finally:
        plugins.unregister("test-broken-priority")
    assert sorted(await ready_keys(q)) == sorted(old)

    without = Plugins(disabled=["priority"])
    without.load_entry_points()
    assert without.info["priority"].status == "blocked"
    clock.advance(1000)
    assert (await age_ready(q.store, without, AgingSettings(), clock.now())).moved == 0

    plugins.register(Urgent(), name="test-urgent")
    try:
        assert (await age_ready(q.store, plugins, AgingSettings(), clock.now())).moved == 3
    finally:
        plugins.unregister("test-urgent")
    assert sorted(await ready_keys(q)) == sorted(moved(k, q, 250) for k in old)
    assert (await age_ready(q.store, plugins, AgingSettings(enabled=False), clock.now() + 10**6)).moved == 0
    await q.close()


async def test_a_moved_marker_claims_and_a_retry_starts_again_from_the_tasks_priority(clocked):
    q, clock = clocked
    task = await q.submit("flaky", None, priority=10)
    clock.advance(490)  # at the cap (10 -> 128 would be short of a jump)
    assert (await age_ready(q.store, q.plugins, AgingSettings(), clock.now())).moved == 1
    assert await ready_keys(q) == [keys.ready(q.name, 255, task.available_at, task.id, "flaky")]

    worker = Worker(q, concurrency=1, aging=False, **FAST)
    attempts: list[int] = []

    @worker.handler("flaky")
    async def flaky(input: Any, ctx: Any) -> None:
        attempts.append(ctx.attempt)
        raise qo.Retry(delay=3600)

    run = asyncio.create_task(worker.run())

    async def retried() -> bool:
        t = await q.get(task.id)
        return t.status == "pending" and t.attempt == 1

    await wait_until(retried)
    worker.stop()
    await run
    stored = await q.get(task.id)
    assert attempts == [1] and stored.priority == 10  # the task's priority never changed
    assert await ready_keys(q) == []  # the aged marker was claimed and deleted
    delayed = [e.key for e in await q.storage.list(keys.delayed_prefix(q.name))]
    assert delayed == [keys.delayed(q.name, 10, stored.available_at, task.id, "flaky")]


# -- aging under a flood of priority-255 work (fake clock) ---------------------------


async def flood(q, clock, aging: AgingSettings, *, watch_until: float) -> tuple[Any, dict[str, float], int, Any]:
    """One worker (one slot) runs while priority-255 tasks arrive twice as fast as it runs
    them; once the flood is on, one priority-0 task is submitted. Returns when that task
    started or the fake clock passed ``watch_until`` seconds after it became due."""
    worker = Worker(q, concurrency=1, aging=aging, poll_min=0.01, poll_max=0.05, sweep_interval=0.2,
                    buffer_max_age=FLOOD_BUFFER_AGE, shutdown_timeout=5.0)
    starts: dict[str, float] = {}

    @worker.handler("job")
    async def job(input: Any, ctx: Any) -> None:
        starts[ctx.task.id] = clock.now()
        await clock.sleep(TASK_SECONDS)

    submitted = 0

    async def produce() -> None:
        nonlocal submitted
        while True:
            await q.submit("job", "flood", priority=255)
            submitted += 1
            await clock.sleep(TASK_SECONDS / 2)

    producer = asyncio.create_task(produce())
    run = asyncio.create_task(worker.run())
    low = None

    async def flooding() -> bool:
        return len(starts) >= 3 and submitted > len(starts) + 2

    async def done() -> bool:
        return low.id in starts or clock.now() > low.available_at + watch_until

    try:
        await wait_until(flooding)
        low = await q.submit("job", "low", priority=0)
        await wait_until(done, timeout=60)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        worker.stop()
        stats = await run
    return low, starts, submitted, stats


async def test_with_aging_a_priority_0_task_starts_within_the_bound_under_a_flood_of_255(clocked):
    q, clock = clocked
    bound = FLOOD_AGING.start_bound(0, workers=1, buffer_max_age=FLOOD_BUFFER_AGE, longest_task=TASK_SECONDS)
    assert bound == pytest.approx(2.0 + 0.15 + 0.25 + 0.2)
    low, starts, submitted, stats = await flood(q, clock, FLOOD_AGING, watch_until=2 * bound)
    assert low.id in starts, f"the priority-0 task did not start within {2 * bound:.2f}s"
    waited = starts[low.id] - low.available_at
    assert waited <= bound + ROUND_TRIPS, f"started after {waited:.2f}s; bound {bound:.2f}s"
    assert waited >= FLOOD_AGING.time_to_cap() - FLOOD_AGING.step_seconds  # the flood did hold it back
    ran_meanwhile = sum(1 for t in starts.values() if low.available_at <= t < starts[low.id])
    assert ran_meanwhile >= 5 and submitted > len(starts) + 5  # a real flood: the backlog grew
    assert stats["aged"] >= 1


async def test_without_aging_a_priority_0_task_waits_while_255s_keep_coming(clocked):
    q, clock = clocked
    bound = FLOOD_AGING.start_bound(0, workers=1, buffer_max_age=FLOOD_BUFFER_AGE, longest_task=TASK_SECONDS)
    off = AgingSettings(enabled=False, step_seconds=0.5, step_levels=64, interval=0.1)
    low, starts, submitted, stats = await flood(q, clock, off, watch_until=2 * bound)
    assert low.id not in starts
    assert sum(1 for t in starts.values() if t >= low.available_at) >= 10 and submitted > len(starts) + 5
    stored = await q.get(low.id)
    assert (stored.status, stored.attempt) == ("pending", 0)
    assert stats["aged"] == 0
    assert keys.ready(q.name, 0, low.available_at, low.id, "job") in await ready_keys(q)


# -- the effective priority shown -----------------------------------------------------


async def test_the_effective_priority_of_a_stored_task(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="eff", clock=clock)
    due = await q.submit("t", None, priority=0)
    later = await q.submit("t", None, priority=0, schedule_at=datetime.fromtimestamp(clock.now() + 3600, timezone.utc))
    clock.advance(330)
    assert task_effective_priority(q.plugins, due, clock.now()) == 160
    assert task_effective_priority(q.plugins, due, clock.now(), AgingSettings(enabled=False)) == 0
    assert task_effective_priority(q.plugins, later, clock.now()) == 0  # not due yet
    entry = ReadyEntry(200, due.available_at, due.id, "t", AgingSettings())
    assert entry.id == due.id and effective_priority(q.plugins, entry, 330) == 200
    await q.close()


def test_status_and_list_show_the_effective_priority(storage_url, monkeypatch):
    async def setup() -> tuple[str, str]:
        past = FakeClock(time.time() - 330)  # submitted 5.5 minutes ago: floor 160
        async with await qo.connect(storage_url, clock=past) as q:
            old = await q.submit("t", None, priority=0)
        async with await qo.connect(storage_url) as q:
            fresh = await q.submit("t", None, priority="high")
        return old.id, fresh.id

    old, fresh = asyncio.run(setup())

    def cli(*args: str) -> str:
        result = CliRunner().invoke(build_cli(), [*args, "--url", storage_url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    status = json.loads(cli("status", old, "--json"))
    assert (status["priority"], status["effective_priority"]) == (0, 160)
    assert "priority:   0 (effective 160)" in cli("status", old)
    assert "priority:   192 (effective 192)" in cli("status", fresh)
    rows = {r["id"]: r for r in map(json.loads, cli("list", "--json").splitlines())}
    assert (rows[old]["effective_priority"], rows[fresh]["effective_priority"]) == (160, 192)
    table = {line.split()[0]: line.split()[3] for line in cli("list").splitlines()[1:]}
    assert table == {old: "0->160", fresh: "192"}

    monkeypatch.setenv("QO_AGING", "off")
    assert json.loads(cli("status", old, "--json"))["effective_priority"] == 0
    assert {line.split()[0]: line.split()[3] for line in cli("list").splitlines()[1:]}[old] == "0"


async def test_a_cancelled_tasks_aged_marker_is_deleted_on_first_sight(storage_url, fast_settings):
    """Cancel deletes the marker at the task's own level; one that aging moved up stays.
    A worker that lists it deletes it at once (the task ended at the marker's own due
    time, so no way back to pending can reuse it), not after the orphan grace."""
    async with ticking_queue(storage_url, "aged", speed=1.0) as (q, clock):
        task = await q.submit("t", None, priority=0)
        own = task.marker_key(q.name, clock.now())
        aged = moved(own, q, 255)
        await q.storage.put(aged, b"")  # what an aging pass does: PUT the new, DELETE the old
        await q.storage.delete(own)
        await q.cancel(task.id)
        assert await ready_keys(q) == [aged]
        w = Worker(q, settings=fast_settings)
        w.handler("t")(lambda input: None)
        stats = await asyncio.wait_for(w.run(until_idle=True), 30)
        assert await ready_keys(q) == []
        assert clock.now() - task.available_at < fast_settings.orphan_grace
        assert stats["completed"] == 0 and (await q.get(task.id)).status == "cancelled"
