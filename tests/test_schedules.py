"""Recurring schedules: cron and DST, the queue.schedules API, the scheduler's exactly-once
firing with racing and dying instances, catch-up, pause/resume, trigger, the CLI.

Storage-facing tests run on local and on S3 (moto), on a fake clock.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from croniter import croniter

import qo
from qo import keys
from qo.cli import build_cli
from qo.clock import FakeClock
from qo.policies.cron import check_cron, next_fire
from qo.schedule_model import MAX_CRON_LENGTH, ScheduleNotFound, schedules_prefix
from qo.scheduler import Scheduler, plan
from qo.worker import Worker

from sched_procs import run_scaled_scheduler

UTC = timezone.utc
CTX = multiprocessing.get_context("spawn")
QO = Path(sys.executable).with_name("qo")


def ts(text: str) -> float:
    """Epoch seconds of an ISO time (with offset)."""
    return datetime.fromisoformat(text).timestamp()


def iso_utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


async def all_tasks(q) -> list[qo.Task]:
    return [t async for t in q.list(limit=None)]


async def listed_task_ids(q) -> list[str]:
    """The ids of every stored task, from LISTs alone (cheap on S3)."""
    out, cursor = [], None
    while True:
        page = await q.storage.list(keys.tasks_prefix(q.name), start_after=cursor, limit=1000)
        out += [e.key.rsplit("/", 1)[-1].removesuffix(".json") for e in page]
        if len(page) < 1000:
            return out
        cursor = page[-1].key


async def drive(schedulers, clock: FakeClock, until: float, step=lambda: 60.0) -> list:
    """Advance the shared fake clock step by step to ``until``; at each step every scheduler
    makes one pass, all at once. Returns everything they fired."""
    fired = []
    while clock.now() < until:
        clock.set(min(until, clock.now() + step()))
        for batch in await asyncio.gather(*(s.run_once() for s in schedulers)):
            fired += batch
    return fired


def wakeups(fire_times: list[float], rng: random.Random) -> list[float]:
    """The instants a daemon wakes at around each fire time: sometimes just before it (not
    due yet), then at it plus a lateness within the 60 s grace."""
    out = []
    for t in fire_times:
        if rng.random() < 0.15:
            out.append(t - 0.5)
        out.append(t + rng.choice([0.0, rng.uniform(0, 45)]))
    return sorted(out)


async def drive_at(schedulers, clock: FakeClock, instants: list[float], rng: random.Random) -> list:
    """At each instant a random non-empty subset of the schedulers makes a pass: a third
    of the time all at once (a race), otherwise one after the other in random order (the
    daemon's jitter usually lets one win and the others find the work done)."""
    fired = []
    for t in instants:
        if t > clock.now():
            clock.set(t)
        chosen = [s for s in schedulers if rng.random() < 0.5] or [rng.choice(schedulers)]
        if rng.random() < 1 / 3:
            batches = await asyncio.gather(*(s.run_once() for s in chosen))
        else:
            rng.shuffle(chosen)
            batches = [await s.run_once() for s in chosen]
        for batch in batches:
            fired += batch
    return fired


# -- cron and DST, no storage ----------------------------------------------------------


def oracle(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time in (start, end] by brute force, minute by minute in UTC: the rule of
    qo/policies/cron.py, stated independently (minute and hour fields only)."""
    exp = croniter(expr).expanded
    minutes = set(range(60)) if exp[0] == ["*"] else set(exp[0])
    hours = set(range(24)) if exp[1] == ["*"] else set(exp[1])
    interval = expr.split()[1].startswith("*")

    def match(wall: datetime) -> bool:
        return wall.minute in minutes and wall.hour in hours

    out, t = [], start.astimezone(UTC)  # step in real time, not wall time
    prev_wall = start.astimezone(tz).replace(tzinfo=None)
    while t < end:
        t += timedelta(minutes=1)
        local = t.astimezone(tz)
        wall = local.replace(tzinfo=None)
        if interval:
            fire = match(wall)  # real time: both passes of a repeated hour, nothing in a gap
        else:
            repeat = local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()
            skipped = []
            w = prev_wall + timedelta(minutes=1)
            while w < wall:  # wall times the clock jumped over
                skipped.append(w)
                w += timedelta(minutes=1)
            fire = (match(wall) and not repeat) or any(match(s) for s in skipped)
        if fire:
            out.append(t)
        prev_wall = wall
    return out


DST_DAYS = [
    ("Europe/Berlin", "2026-03-29"), ("Europe/Berlin", "2026-10-25"),
    ("America/New_York", "2026-03-08"), ("America/New_York", "2026-11-01"),
    ("Australia/Lord_Howe", "2026-04-05"), ("Australia/Lord_Howe", "2026-10-04"),  # 30-minute shifts
]
EXPRESSIONS = ["30 2 * * *", "30 1 * * *", "15,45 2 * * *", "* 2 * * *", "0 * * * *", "7 * * * *",
               "*/5 * * * *", "0 */2 * * *"]


@pytest.mark.parametrize("zone, day", DST_DAYS)
def test_next_fire_matches_a_brute_force_oracle_across_dst(zone, day):
    tz = ZoneInfo(zone)
    start = (datetime.fromisoformat(day).replace(tzinfo=tz) - timedelta(hours=12)).astimezone(UTC)
    end = start + timedelta(hours=48)  # UTC arithmetic: real time
    for expr in EXPRESSIONS:
        expected = oracle(expr, tz, start, end)
        got, t = [], start
        while True:
            t = next_fire(check_cron(expr), tz, t)
            if t > end:
                break
            got.append(t.astimezone(UTC))
        assert [iso_utc(g.timestamp()) for g in got] == [iso_utc(e.timestamp()) for e in expected], expr


@pytest.mark.parametrize("zone, day, expected", [
    ("Europe/Berlin", "2026-03-29", "2026-03-29T01:00:00"),     # 02:30 does not exist: 03:00 CEST
    ("Europe/Berlin", "2026-10-25", "2026-10-25T00:30:00"),     # 02:30 twice: first pass (CEST) only
    ("America/New_York", "2026-03-08", "2026-03-08T07:00:00"),  # 02:30 does not exist: 03:00 EDT
    ("America/New_York", "2026-11-01", "2026-11-01T07:30:00"),  # 02:30 EST (01:00-02:00 repeats there)
])
def test_a_0230_job_fires_once_on_dst_days(zone, day, expected):
    tz = ZoneInfo(zone)
    t = datetime.fromisoformat(day).replace(tzinfo=tz) - timedelta(hours=6)
    fires = []
    for _ in range(3):
        t = next_fire(check_cron("30 2 * * *"), tz, t)
        fires.append(t)
    on_the_day = [f for f in fires if f.astimezone(tz).date().isoformat() == day]
    assert [iso_utc(f.timestamp()) for f in on_the_day] == [expected]


def test_seconds_field_is_last_and_aliases_work():
    t = next_fire(check_cron("*/10 * * * * 30"), ZoneInfo("UTC"), datetime(2026, 1, 1, tzinfo=UTC))
    assert t == datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert check_cron(" @Daily ") == "0 0 * * *" and check_cron("0  3 *  * MON-FRI") == "0 3 * * MON-FRI"


def test_plan_applies_the_catch_up_policy():
    from qo.schedule_model import Schedule

    step = 300.0
    nxt = lambda t: (t // step + 1) * step  # noqa: E731 - every 5 minutes
    base = 1_800_000_000.0 - 1_800_000_000.0 % step
    sched = Schedule(name="p", cron="*/5 * * * *", task_type="t", next_fire_at=base, grace_seconds=60,
                     catch_up="skip")
    now = base + 3 * 3600 + 150  # 3 h later, 2.5 min after the last fire time
    assert plan(sched, now, nxt).fire == []
    assert plan(sched, now, nxt).next_fire_at == base + 3 * 3600 + step
    sched.catch_up = "latest"
    assert plan(sched, now, nxt).fire == [base + 3 * 3600]
    sched.catch_up, sched.max_catch_up = "all", 10
    assert plan(sched, now, nxt).fire == [base + 3 * 3600 - i * step for i in range(9, -1, -1)]
    sched.catch_up = "skip"
    assert plan(sched, base + 3 * 3600 + 30, nxt).fire == [base + 3 * 3600]  # 30 s late: on time
    sched.enabled = False
    assert plan(sched, now, nxt).fire == []


# -- the API: validation, add/get/list/remove, pause/resume, trigger --------------------


@pytest.fixture
async def clocked(storage_url):
    """A queue on a fake clock (2027-01-15T08:00:00Z, a whole hour)."""
    clock = FakeClock(1_800_000_000.0)
    q = await qo.connect(storage_url, queue="q", clock=clock)
    yield q, clock
    await q.close()


@pytest.mark.parametrize("kwargs, field", [
    ({"name": "bad name"}, "name"),
    ({"name": "-x"}, "name"),
    ({"cron": "61 * * * *"}, "cron"),
    ({"cron": "* * * *"}, "cron"),
    ({"cron": "0 0 30 2 *"}, "cron"),  # never fires
    ({"cron": "every day"}, "cron"),  # no plugin understands it
    ({"cron": "0" + ",0" * 128 + " * * * *"}, "cron"),  # valid but 265 characters: over MAX_CRON_LENGTH
    ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
    ({"timezone": "../etc/passwd"}, "timezone"),
    ({"catch_up": "sometimes"}, "catch_up"),
    ({"max_catch_up": -1}, "max_catch_up"),
    ({"task_type": "9lives"}, "task_type"),
    ({"input": {"x": float("nan")}}, "input"),
    ({"priority": 300}, "priority"),
    ({"max_retries": -1}, "max_retries"),
    ({"timeout_seconds": 0}, "timeout_seconds"),
])
async def test_bad_arguments_are_named_and_nothing_is_written(clocked, kwargs, field):
    q, _ = clocked
    args = {"name": "s", "cron": "*/5 * * * *", "task_type": "t", **kwargs}
    with pytest.raises(qo.InvalidInput) as err:
        await q.schedules.add(args.pop("name"), **args)
    assert err.value.field == field
    assert await q.storage.list("q/") == []


async def test_add_get_list_remove_and_a_duplicate_name(clocked):
    q, clock = clocked
    s = await q.schedules.add("nightly", cron="30 2 * * *", task_type="report", input={"full": True},
                              timezone="Europe/Berlin", catch_up="all", priority="high", max_retries=1)
    assert s.next_fire_at == ts("2027-01-16T02:30:00+01:00")
    assert s.local(s.next_fire_at) == "2027-01-16T02:30:00+01:00"
    assert s.task_options() == {"priority": 192, "max_retries": 1}  # not given: the queue's at each fire
    with pytest.raises(qo.InvalidInput) as err:
        await q.schedules.add("nightly", cron="* * * * *", task_type="other")
    assert err.value.field == "name" and "already exists" in str(err.value)
    assert (await q.schedules.get("nightly")).task_type == "report"  # untouched
    await q.schedules.add("a-first", cron="@hourly", task_type="t")
    assert [x.name for x in await q.schedules.list()] == ["a-first", "nightly"]
    assert (await q.schedules.remove("a-first")).name == "a-first"
    with pytest.raises(ScheduleNotFound):
        await q.schedules.get("a-first")
    with pytest.raises(ScheduleNotFound):
        await q.schedules.remove("a-first")
    assert [x.name for x in await q.schedules.list()] == ["nightly"]
    assert keys.ms(s.next_fire_at) and (await q.storage.list(schedules_prefix("q")))[0].key == "q/schedules/nightly.json"


async def test_pause_and_resume(clocked):
    q, clock = clocked
    await q.schedules.add("tick", cron="*/5 * * * *", task_type="t")
    scheduler = Scheduler(q)
    assert len(await drive([scheduler], clock, clock.now() + 1800, step=lambda: 50)) == 6
    assert not (await q.schedules.pause("tick")).enabled
    assert not (await q.schedules.pause("tick")).enabled  # idempotent
    assert await drive([scheduler], clock, clock.now() + 3600, step=lambda: 150) == []  # paused: nothing
    resumed = await q.schedules.resume("tick")
    assert resumed.enabled and resumed.next_fire_at == clock.now() + 300  # not the hour missed while paused
    fired = await drive([scheduler], clock, clock.now() + 900, step=lambda: 50)
    assert [f.fire_at for f in fired] == [clock.now() - 600, clock.now() - 300, clock.now()]
    assert len(await all_tasks(q)) == 9


async def test_trigger_fires_now_without_moving_the_schedule(clocked):
    q, clock = clocked
    s = await q.schedules.add("nightly", cron="0 3 * * *", task_type="report", input=[1])
    await q.schedules.pause("nightly")
    one, two = await q.schedules.trigger("nightly"), await q.schedules.trigger("nightly")
    assert one.id != two.id and one.task_type == "report" and one.input == [1]
    assert one.available_at == clock.now()  # due at once
    after = await q.schedules.get("nightly")
    assert after.next_fire_at == s.next_fire_at and after.fired == 0
    with pytest.raises(ScheduleNotFound):
        await q.schedules.trigger("nope")
    assert {t.id for t in await all_tasks(q)} == {one.id, two.id}


# -- exactly once: racing and dying schedulers -------------------------------------------


#: ticks of a 5-minute cron driven per backend: a day locally, 8 hours on the emulated
#: clouds (each tick is the same CAS race; moto and Azurite make it slow, not different)
TICKS = {"local": 288, "s3": 96, "azure": 96}


async def test_three_schedulers_fire_every_tick_of_a_day_once(storage_url, backend):
    clock = FakeClock(1_800_000_000.0)
    queues = [await qo.connect(storage_url, queue="q", clock=clock) for _ in range(3)]
    n = TICKS[backend]
    try:
        await queues[0].schedules.add("every5", cron="*/5 * * * *", task_type="tick")
        expected = [1_800_000_000.0 + 300 * i for i in range(1, n + 1)]
        rng = random.Random(5)
        fired = await drive_at([Scheduler(q) for q in queues], clock, wakeups(expected, rng), rng)
        assert sorted(f.fire_at for f in fired) == expected  # each reported once, by the CAS winner
        ids = await listed_task_ids(queues[0])
        assert len(ids) == n and set(ids) == {f.task_id for f in fired}
        s = await queues[0].schedules.get("every5")
        assert s.fired == n and s.last_fire_at == expected[-1] and s.next_fire_at == expected[-1] + 300
    finally:
        for q in queues:
            await q.close()


class Killed(BaseException):
    """A scheduler's process died here: a BaseException, like SystemExit, so that nothing
    in qo catches it (a bug's Exception in one schedule is caught: it costs that schedule)."""


class Dying:
    """Storage that raises ``Killed`` on chosen writes: ``kill(predicate)`` arms it."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.predicate = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def put(self, key, data, **kw):
        if self.predicate is not None and self.predicate(key, kw):
            self.predicate = None
            raise Killed(key)
        return await self.inner.put(key, data, **kw)


async def test_a_scheduler_dying_between_submit_and_advance_is_finished_by_another(clocked, storage_url):
    q, clock = clocked
    await q.schedules.add("every5", cron="*/5 * * * *", task_type="tick")
    dying = await qo.connect(storage_url, queue="q", clock=clock, wrap_storage=Dying)
    try:
        dying.storage.predicate = lambda key, kw: "/schedules/" in key and kw.get("if_match")
        clock.advance(300)
        with pytest.raises(Killed):
            await Scheduler(dying).run_once()
        [task] = await all_tasks(q)  # submitted ...
        assert (await q.schedules.get("every5")).next_fire_at == clock.now()  # ... not advanced
        [fired] = await Scheduler(q).run_once()
        assert fired.task_id == task.id and fired.fire_at == clock.now()  # the same task: no double
        assert [t.id for t in await all_tasks(q)] == [task.id]
        assert (await q.schedules.get("every5")).next_fire_at == clock.now() + 300
    finally:
        await dying.close()


async def test_schedulers_killed_at_random_writes_lose_none_and_double_none(storage_url):
    """Instance A dies at a random write (idempotency record, marker, task, schedule CAS)
    and restarts with an empty cache; B runs only every other step, so A's restarts
    must finish A's own half-done fires as well."""
    clock = FakeClock(1_800_000_000.0)
    a_queue = await qo.connect(storage_url, queue="q", clock=clock, wrap_storage=Dying)
    b_queue = await qo.connect(storage_url, queue="q", clock=clock)
    rng = random.Random(7)
    try:
        # "all": a fire time missed while the schedulers keep dying is still fired later
        await b_queue.schedules.add("every5", cron="*/5 * * * *", task_type="tick", catch_up="all")
        a, b = Scheduler(a_queue), Scheduler(b_queue)
        expected = [1_800_000_000.0 + 300 * i for i in range(1, 36 + 1)]
        fired, deaths = [], 0
        for t in wakeups(expected, rng):
            clock.set(max(clock.now(), t))
            if rng.random() < 0.6:  # die at the 1st..4th write of this pass
                a_queue.storage.predicate = lambda key, kw, n=[rng.randint(1, 4)]: (n.__setitem__(0, n[0] - 1)
                                                                                   or n[0] == 0)
            try:
                fired += await a.run_once()
            except Killed:
                deaths += 1
                a = Scheduler(a_queue)  # a new process
            a_queue.storage.predicate = None
            if rng.random() < 0.5:
                fired += await b.run_once()
        fired += await b.run_once()
        assert deaths >= 10
        assert sorted(f.fire_at for f in fired) == expected
        ids = await listed_task_ids(b_queue)
        assert len(ids) == 36 and set(ids) == {f.task_id for f in fired}
    finally:
        await a_queue.close()
        await b_queue.close()


# -- catch-up after downtime --------------------------------------------------------------

BASE = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize("policy, max_catch_up, back_at, expected", [
    # the outage: fire times 08:10 .. 11:05 (36) pass with no scheduler running
    ("skip", 100, "11:07:30", []),
    ("skip", 100, "11:05:30", ["11:05"]),  # 30 s late is within the 60 s grace: on time
    ("latest", 100, "11:07:30", ["11:05"]),
    ("all", 100, "11:07:30", [f"{h:02d}:{m:02d}" for h in range(8, 12) for m in range(0, 60, 5)
                              if "08:10" <= f"{h:02d}:{m:02d}" <= "11:05"]),
    ("all", 10, "11:07:30", ["10:20", "10:25", "10:30", "10:35", "10:40", "10:45", "10:50", "10:55", "11:00",
                             "11:05"]),
])
async def test_catch_up_after_a_3_hour_outage(clocked, policy, max_catch_up, back_at, expected):
    q, clock = clocked

    def at(hhmm: str) -> float:
        return ts(f"2027-01-15T{hhmm}+00:00")

    await q.schedules.add("five", cron="*/5 * * * *", task_type="t", catch_up=policy, max_catch_up=max_catch_up)
    scheduler = Scheduler(q)
    clock.set(at("08:05"))
    assert [f.fire_at for f in await scheduler.run_once()] == [at("08:05")]
    clock.set(at(back_at))  # three hours later
    fired = await Scheduler(q).run_once()
    assert [iso_utc(f.fire_at)[11:16] for f in fired] == expected
    assert (await q.schedules.get("five")).next_fire_at == at("11:10")
    clock.set(at("11:10"))
    assert [f.fire_at for f in await scheduler.run_once()] == [at("11:10")]  # and on as usual
    assert len(await listed_task_ids(q)) == 1 + len(expected) + 1


# -- DST through the scheduler ------------------------------------------------------------


@pytest.mark.parametrize("zone, day, d0230, d0130", [
    ("Europe/Berlin", "2026-03-29", "2026-03-29T01:00:00", "2026-03-29T00:30:00"),     # 02:30 skipped: 03:00
    ("Europe/Berlin", "2026-10-25", "2026-10-25T00:30:00", "2026-10-24T23:30:00"),     # 02:30 twice: once
    ("America/New_York", "2026-03-08", "2026-03-08T07:00:00", "2026-03-08T06:30:00"),  # 02:30 skipped: 03:00
    ("America/New_York", "2026-11-01", "2026-11-01T07:30:00", "2026-11-01T05:30:00"),  # 01:30 twice: once
])
async def test_dst_days_fire_daily_jobs_once_and_hourly_jobs_in_real_time(storage_url, zone, day, d0230, d0130):
    tz = ZoneInfo(zone)
    start = datetime.fromisoformat(day).replace(tzinfo=tz).timestamp() - 1800  # 23:30 the evening before
    end = datetime.fromisoformat(day).replace(hour=6, tzinfo=tz).timestamp()
    clock = FakeClock(start)
    q = await qo.connect(storage_url, queue="dst", clock=clock)
    try:
        for name, cron in (("d0230", "30 2 * * *"), ("d0130", "30 1 * * *"), ("hourly", "0 * * * *")):
            await q.schedules.add(name, cron=cron, task_type=name, timezone=zone)
        scheduler = Scheduler(q)
        fired = await scheduler.run_once()
        while scheduler.next_wake() <= end:  # wake as the daemon does: at the next fire time
            clock.set(scheduler.next_wake())
            fired += await scheduler.run_once()
        by = {name: [iso_utc(f.fire_at) for f in fired if f.name == name] for name in ("d0230", "d0130", "hourly")}
        assert by["d0230"] == [d0230] and by["d0130"] == [d0130]
        first_hour = start - start % 3600 + 3600
        assert by["hourly"] == [iso_utc(t) for t in range(int(first_hour), int(end) + 1, 3600)]  # no gap, no double
        assert len(await listed_task_ids(q)) == len(fired)
    finally:
        await q.close()


# -- another kind of schedule through the qo_next_fire hook ------------------------------


class EverySeconds:
    """A plugin: ``every <n>s`` fires on multiples of n seconds since the epoch."""

    @qo.hookimpl
    def qo_next_fire(self, schedule, after):
        text = schedule.cron
        if not (text.startswith("every ") and text.endswith("s")):
            return None
        n = int(text[6:-1])
        return datetime.fromtimestamp((after.timestamp() // n + 1) * n, UTC)


async def test_a_plugin_adds_a_kind_of_schedule(clocked):
    from qo.plugins import get_plugins

    q, clock = clocked
    plugins = get_plugins()
    plugins.register(EverySeconds(), name="test-every")
    try:
        s = await q.schedules.add("ninety", cron="every 90s", task_type="t")
        assert s.next_fire_at == BASE + 90 - BASE % 90
        fired = await drive([Scheduler(q)], clock, BASE + 900, step=lambda: 30)
        assert [f.fire_at % 90 for f in fired] == [0.0] * 10
    finally:
        plugins.unregister("test-every")
    with pytest.raises(qo.InvalidInput) as err:  # without the plugin nobody understands it
        await q.schedules.add("again", cron="every 90s", task_type="t")
    assert err.value.field == "cron"


# -- schedule_at: not before its time, within a poll interval after ----------------------


async def test_schedule_at_starts_within_one_poll_interval_and_not_before(storage_url):
    """On a fake clock moved in 50 ms steps (storage I/O takes no simulated time)."""
    clock = FakeClock(BASE)
    q = await qo.connect(storage_url, queue="at", clock=clock)
    poll_max = 1.0
    worker = Worker(q, settings=qo.WorkerSettings(poll_min=0.05, poll_max=poll_max, sweep_interval=60))
    started = []

    @worker.handler("at")
    async def at(input, ctx):
        started.append((input, clock.now()))

    due = [BASE + 1.0, BASE + 2.3]
    for i, t in enumerate(due):
        await q.submit("at", i, schedule_at=datetime.fromtimestamp(t, UTC))
    run = asyncio.create_task(worker.run())
    try:
        while len(started) < 2 and clock.now() < BASE + 20:
            await asyncio.sleep(0.02)  # let the worker do its I/O at this instant
            clock.advance(0.05)
    finally:
        worker.stop()
        await run
        await q.close()
    assert [i for i, _ in started] == [0, 1]
    for (i, at_time) in started:
        assert due[i] <= at_time <= due[i] + 1.2 * poll_max + 0.1  # poll jitter is 0.8x-1.2x


# -- processes: real deaths, the CLI, the daemon -------------------------------------------


async def fire_records(q) -> dict[int, str]:
    """fire time (ms) -> task id, from the idempotency records of the schedule fires."""
    out: dict[int, str] = {}
    for entry in await q.storage.list(f"{q.name}/idem/custom.schedule/"):
        record = json.loads((await q.storage.get(entry.key)).data)
        fire_ms = int(record["key"].split("@", 1)[1].split("#", 1)[0])
        assert fire_ms not in out
        out[fire_ms] = record["task_id"]
    return out


async def test_scheduler_processes_killed_at_random_lose_none_and_double_none(storage_url):
    """Three scheduler processes on a clock 5x real time fire a per-second schedule; one is
    SIGKILLed (mid-request, mid-fire: wherever it is) every half second and replaced."""
    from sched_procs import ScaledClock

    speed, t0 = 5.0, time.time() + 1.0
    clock = ScaledClock(BASE, t0, speed)
    q = await qo.connect(storage_url, queue="mp", clock=clock)
    s = await q.schedules.add("secs", cron="* * * * * *", task_type="tick", catch_up="all", max_catch_up=1000)
    stop_at = BASE + 15.0  # 3 s of real time after t0
    args = (storage_url, "mp", BASE, t0, speed, stop_at)
    procs = [CTX.Process(target=run_scaled_scheduler, args=args) for _ in range(3)]
    for p in procs:
        p.start()
    kills, rng = 0, random.Random(3)
    try:
        # three kills at least: on a loaded machine the set-up above can outlast the
        # window before stop_at, and then the loop never ran (kills == 0)
        while clock.now() < stop_at - 5 or kills < 3:
            await asyncio.sleep(0.5)
            victim = rng.randrange(len(procs))
            procs[victim].kill()
            procs[victim].join()
            kills += 1
            procs[victim] = CTX.Process(target=run_scaled_scheduler, args=args)
            procs[victim].start()
        for p in procs:
            await asyncio.get_running_loop().run_in_executor(None, p.join, 60)
            assert p.exitcode == 0
        await Scheduler(q).run_once()  # whatever is due now, after the last one stopped
        records = await fire_records(q)
        last = (await q.schedules.get("secs")).last_fire_at
        expected = list(range(keys.ms(s.next_fire_at), keys.ms(last) + 1, 1000))
        assert kills >= 3 and len(expected) >= 15
        assert sorted(records) == expected  # every second fired: none missed
        ids = await listed_task_ids(q)
        assert sorted(ids) == sorted(records.values())  # one task each: none doubled
    finally:
        for p in procs:
            p.kill()
        await q.close()


def cli(url: str, *args: str):
    return CliRunner().invoke(build_cli(), [*args, "--url", url], catch_exceptions=False)


def test_cli_schedule_commands(storage_url):
    add = ["schedule", "add", "nightly", "--cron", "30 2 * * *", "--type", "report", "--timezone", "Europe/Berlin",
           "--input", '{"full": true}', "--catch-up", "all", "--priority", "high"]
    r = cli(storage_url, *add)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("added nightly: next fire ") and "T02:30:00+0" in r.output
    for args, option in [(["--cron", "61 * * * *"], "--cron"), (["--cron", _long_cron(MAX_CRON_LENGTH + 1)], "--cron"),
                         (["--timezone", "Nowhere/Land"], "--timezone"),
                         (["--catch-up", "never"], "--catch-up"), (["--type", "9x"], "--type")]:
        bad = cli(storage_url, "schedule", "add", "other", *["--cron", "* * * * *", "--type", "t", *args])
        assert bad.exit_code == 1 and bad.output.startswith(f"error: {option}: "), bad.output
    dup = cli(storage_url, *add)
    assert dup.exit_code == 1 and "already exists" in dup.output
    listing = cli(storage_url, "schedule", "list")
    lines = listing.output.splitlines()
    assert len(lines) == 2 and lines[0].split()[:4] == ["NAME", "STATE", "CRON", "TIMEZONE"]
    assert "nightly  enabled  30 2 * * *  Europe/Berlin" in lines[1] and "T02:30:00+0" in lines[1]
    shown = json.loads(cli(storage_url, "schedule", "show", "nightly", "--json").output)
    assert shown["catch_up"] == "all" and shown["options"]["priority"] == 192
    assert shown["next_fire_at_local"][11:19] == "02:30:00" and shown["next_fire_at"].endswith("+00:00")
    text = cli(storage_url, "schedule", "show", "nightly").output
    assert "timezone:     Europe/Berlin" in text and "catch-up:     all (max 100, grace 60s)" in text
    assert cli(storage_url, "schedule", "pause", "nightly").output == "paused nightly\n"
    assert " paused " in cli(storage_url, "schedule", "list").output
    assert cli(storage_url, "schedule", "resume", "nightly").output.startswith("resumed nightly: next fire")
    task_id = cli(storage_url, "schedule", "trigger", "nightly").output.strip()
    status = json.loads(cli(storage_url, "status", task_id, "--json").output)
    assert status["task_type"] == "report" and status["input"] == {"full": True} and status["priority"] == 192
    assert cli(storage_url, "schedule", "remove", "nightly").output == "removed nightly\n"
    gone = cli(storage_url, "schedule", "show", "nightly")
    assert gone.exit_code == 1 and "schedule 'nightly' not found" in gone.output
    empty = cli(storage_url, "schedule", "list")
    assert empty.exit_code == 0 and empty.stdout == "" and "no schedules" in empty.stderr


HANDLERS = """
import qo

@qo.handler("tick")
def tick(input, ctx):
    return "ok"
"""


def test_daemon_and_worker_with_scheduler_race_and_stop_on_sigterm(storage_url, tmp_path):
    """`qo schedule run` and `qo worker --with-scheduler` fire one per-second schedule
    together, in real time; every second makes one task, and both stop on SIGTERM."""
    (tmp_path / "handlers.py").write_text(textwrap.dedent(HANDLERS))
    assert cli(storage_url, "schedule", "add", "secs", "--cron", "* * * * * *", "--type", "tick").exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("QO_URL", "QO_QUEUE")}
    common = ["--url", storage_url, "--log-level", "WARNING"]
    procs = [subprocess.Popen([str(QO), "schedule", "run", "--poll-max", "0.2", *common], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([str(QO), "worker", "handlers.py", "--with-scheduler", "--poll-max", "0.2", *common],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]

    async def completed() -> list[qo.Task]:
        async with await qo.connect(storage_url) as q:
            return [t async for t in q.list(status="completed", limit=None)]

    try:
        deadline = time.monotonic() + 30
        while len(asyncio.run(completed())) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "scheduler stopped: fired" in outputs[0][1] and "worker " in outputs[1][1]

    async def check() -> None:
        async with await qo.connect(storage_url) as q:
            records = await fire_records(q)
            assert len(records) >= 3 and sorted(records.values()) == sorted(await listed_task_ids(q))
            span = sorted(records)
            assert span == list(range(span[0], span[-1] + 1, 1000))  # consecutive seconds: none missed

    asyncio.run(check())


def _long_cron(length: int) -> str:
    """A valid cron expression of exactly ``length`` characters: minute 0 listed again and
    again (the first one written ``00`` when the length is even)."""
    rest = length - len("0 * * * *")
    expr = "0" * (1 + rest % 2) + ",0" * (rest // 2) + " * * * *"
    assert len(expr) == length
    return expr


async def test_cron_length_is_capped_at_add(clocked):
    """At the cap it is accepted; one character more is refused naming cron and the limit,
    however valid the expression is (croniter accepts both)."""
    q, _ = clocked
    at_cap = _long_cron(MAX_CRON_LENGTH)
    croniter(at_cap)
    s = await q.schedules.add("at-cap", cron=at_cap, task_type="t")
    assert s.cron == at_cap and s.next_fire_at is not None
    over = _long_cron(MAX_CRON_LENGTH + 1)
    croniter(over)
    for expr in (over, _long_cron(1_000_001)):
        with pytest.raises(qo.InvalidInput) as err:
            await q.schedules.add("over", cron=expr, task_type="t")
        assert err.value.field == "cron" and f"limit is {MAX_CRON_LENGTH}" in str(err.value)
    with pytest.raises(qo.InvalidInput, match="cron"):
        check_cron(_long_cron(MAX_CRON_LENGTH + 1))
    assert [e.key for e in await q.storage.list("q/")] == ["q/schedules/at-cap.json"]


async def test_a_stored_cron_over_the_cap_is_paused_without_parsing_it(clocked, monkeypatch):
    """A hand-written record with a megabyte of (valid) cron: the scheduler pauses it with
    a short error, and croniter never sees the expression."""
    q, clock = clocked
    await q.schedules.add("huge", cron="*/5 * * * *", task_type="t")
    key = "q/schedules/huge.json"
    record = json.loads((await q.storage.get(key)).data)
    await q.storage.put(key, json.dumps({**record, "cron": _long_cron(1_000_001)}).encode())
    parsed: list[int] = []
    import qo.policies.cron as cron_plugin

    real = cron_plugin.croniter

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, expr, *args, **kwargs):
            parsed.append(len(expr))
            super().__init__(expr, *args, **kwargs)

    monkeypatch.setattr(cron_plugin, "croniter", Spy)
    clock.advance(300)
    assert await Scheduler(q).run_once() == []
    s = await q.schedules.get("huge")
    assert not s.enabled and s.last_error.startswith("cron: ") and f"limit is {MAX_CRON_LENGTH}" in s.last_error
    assert len(s.last_error) < 200 and all(n <= MAX_CRON_LENGTH for n in parsed)
    assert await listed_task_ids(q) == []
    with pytest.raises(qo.InvalidInput, match="limit is"):  # resuming it is refused the same way
        await q.schedules.resume("huge")


async def test_a_schedule_that_cannot_fire_is_paused_with_its_error(clocked):
    """A hand-edited record with a broken cron stops, saying why, instead of failing every pass."""
    q, clock = clocked
    await q.schedules.add("broken", cron="*/5 * * * *", task_type="t")
    key = "q/schedules/broken.json"
    record = json.loads((await q.storage.get(key)).data)
    await q.storage.put(key, json.dumps({**record, "cron": "61 * * * *"}).encode())
    clock.advance(300)
    assert await Scheduler(q).run_once() == []
    s = await q.schedules.get("broken")
    assert not s.enabled and "61 * * * *" in s.last_error and "minute" in s.last_error
    assert await listed_task_ids(q) == []


# -- the scheduler's idempotency scope is reserved ------------------------------------------


class MapsTo:
    """A plugin mapping every idempotency scope to ``namespace``."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    @qo.hookimpl
    def qo_idempotency_namespace(self, scope, key, task_type):
        return self.namespace


@pytest.fixture
def maps_to():
    from qo.plugins import get_plugins

    plugins = get_plugins()
    registered = []

    def register(namespace: str) -> None:
        plugins.register(MapsTo(namespace), name=f"maps-to-{len(registered)}")
        registered.append(f"maps-to-{len(registered)}")

    yield register
    for name in registered:
        plugins.unregister(name)


async def test_a_user_cannot_pre_empt_a_fire_and_the_scheduler_fires_it_once(clocked, maps_to):
    q, clock = clocked
    s = await q.schedules.add("every5", cron="*/5 * * * *", task_type="tick", input={"n": 1})
    fire_key = s.fire_key(s.next_fire_at)  # predictable from the schedule record
    attempts = [
        dict(idempotency_key=fire_key, idempotency_scope="custom:schedule"),
        dict(idempotency_scope="custom:schedule"),  # without a key too: the scope itself is the mistake
    ]
    for kwargs in attempts:
        with pytest.raises(qo.InvalidInput) as err:
            await q.submit("evil", {"n": 666}, **kwargs)
        assert err.value.field == "idempotency_scope"
        assert "custom:schedule is reserved for qo's scheduler" in str(err.value)
    with pytest.raises(qo.InvalidInput) as err:
        await q.submit_many([("evil", 1, attempts[0])])
    assert err.value.field == "items[0].idempotency_scope"
    with pytest.raises(qo.InvalidInput) as err:
        await q.submit_graph({"a": {"task_type": "evil", **attempts[0]}})
    assert err.value.field == "nodes[a].idempotency_scope"
    maps_to("custom.schedule")  # a plugin mapping a user's scope onto the scheduler's namespace
    with pytest.raises(qo.InvalidInput) as err:
        await q.submit("evil", {"n": 666}, idempotency_key=fire_key, idempotency_scope="custom:mine")
    assert err.value.field == "idempotency_scope" and "reserved" in str(err.value)
    assert await all_tasks(q) == [] and await q.storage.list("q/idem/") == []  # nothing written
    clock.advance(300)
    fired = [f for _ in range(2) for f in await Scheduler(q).run_once()]  # the plugin cannot move fires either
    assert [f.fire_at for f in fired] == [s.next_fire_at]
    [task] = await all_tasks(q)
    assert task.id == fired[0].task_id and task.task_type == "tick" and task.input == {"n": 1}
    assert await fire_records(q) == {int(s.next_fire_at * 1000): task.id}


async def test_a_plugin_scoping_every_key_alike_leaves_fires_out_of_reach(clocked, maps_to):
    q, clock = clocked
    maps_to("tenant.acme")  # every user key, and before the reservation every fire, lived here
    s = await q.schedules.add("every5", cron="*/5 * * * *", task_type="tick")
    squatter = await q.submit("evil", 1, idempotency_key=s.fire_key(s.next_fire_at), idempotency_scope="queue")
    clock.advance(300)
    [fired] = await Scheduler(q).run_once()
    assert fired.task_id != squatter.id and (await q.get(fired.task_id)).task_type == "tick"
    assert await fire_records(q) == {int(s.next_fire_at * 1000): fired.task_id}


def test_cli_refuses_the_scheduler_scope(storage_url):
    result = CliRunner().invoke(build_cli(), ["submit", "evil", "--idempotency-key", "every5@1#x",
                                              "--idempotency-scope", "custom:schedule", "--url", storage_url])
    assert result.exit_code == 1
    assert "idempotency_scope" in result.output and "reserved for qo's scheduler" in result.output
