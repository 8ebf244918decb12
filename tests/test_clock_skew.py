"""Clocks that disagree: workers on machines 2 minutes ahead and behind, and a local
clock set an hour forward or back while a worker runs (docs/architecture.md §7).

On S3 and Azure every process follows the store's clock (the offset from the Date
header, qo/backend_kit.py): the worker processes here replace their own ``time.time``
(tests/skew_procs.py) and the test proves that leases, schedules, rate limits and aging
still agree with the real time of the store. A local directory store has no clock of
its own to follow: qo follows each process's local clock there, which one machine
shares (the tests below prove that, and what a jump of it does).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

import pytest

import qo
import skew_procs
from qo import keys
from qo.clock import COAST_SECONDS, JUMP_SECONDS, FakeClock, SystemClock

CTX = multiprocessing.get_context("spawn")
AHEAD, BEHIND = 120.0, -120.0
HOUR = 3600.0
#: the lease of the long tasks, and how long they hold it: renewed three times a task, and
#: longer than the offsets of two processes can disagree (about a second: Date has 1 s steps)
LEASE_TTL, HOLD = 3.0, 4.0


# -- one process's clock: SystemClock on a local clock that is set -----------------------


class Machine:
    """A local clock (``wall``) that can be set, beside an elapsed clock no one sets."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.real, self.skew = start, 0.0

    def wall(self) -> float:
        return self.real + self.skew

    def elapsed(self) -> float:
        return self.real

    def run(self, seconds: float) -> None:
        self.real += seconds


class Server:
    """An offset source as the S3 backend keeps one: ``clock_offset`` is the store's
    clock minus the local one, as of the last response (``respond``)."""

    def __init__(self, machine: Machine, server_ahead: float = 0.0):
        self.machine, self.server_ahead, self.clock_offset = machine, server_ahead, 0.0

    def respond(self) -> None:
        self.clock_offset = (self.machine.real + self.server_ahead) - self.machine.wall()


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_a_local_clock_set_while_a_worker_runs_does_not_move_the_store_clock(jump):
    """On S3/Azure a worker's local clock set an hour forward or back never shows in its
    clock: it goes on by elapsed time until the next response's offset makes up for it.
    (Before, a forward jump read once before that response held the clock an hour ahead
    for an hour: it swept every live worker's leases and fired every schedule early.)"""
    m = Machine()
    server = Server(m, server_ahead=AHEAD)
    server.respond()
    clock = SystemClock(server, wall=m.wall, elapsed=m.elapsed)
    assert clock.now() == pytest.approx(m.real + AHEAD)
    m.run(1.0)
    m.skew = jump  # the machine's clock is set; no response yet
    for _ in range(5):
        m.run(0.2)
        assert clock.now() == pytest.approx(m.real + AHEAD)
    server.respond()  # the Date header of the next response
    for _ in range(5):
        m.run(0.2)
        assert clock.now() == pytest.approx(m.real + AHEAD)
    m.run(COAST_SECONDS * 2)
    assert clock.now() == pytest.approx(m.real + AHEAD)


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_on_a_directory_store_a_jump_of_the_machines_clock_is_followed_at_once(jump, caplog):
    """With no store clock (a local directory store), the machine's clock is the store's:
    a jump is followed at once, forward or back, with a warning, as every process on the
    machine follows it. (Before, a clock set back an hour held qo's clock still for that
    hour: no schedule, no delayed task, no rate-limit token until then.)"""
    m = Machine()
    clock = SystemClock(None, wall=m.wall, elapsed=m.elapsed)
    clock.now()
    m.skew = jump
    m.run(1.0)
    assert clock.now() == pytest.approx(m.wall())
    assert any("the local clock moved by" in r.getMessage() for r in caplog.records)
    m.run(1.0)
    assert clock.now() == pytest.approx(m.wall())


def test_a_step_the_store_clock_never_makes_up_for_is_followed_after_the_coast(caplog):
    """On S3 with no response for COAST_SECONDS (an outage) a local step is followed."""
    m = Machine()
    server = Server(m, server_ahead=AHEAD)
    server.respond()
    clock = SystemClock(server, wall=m.wall, elapsed=m.elapsed)
    before = clock.now()
    m.skew = HOUR
    m.run(1.0)
    assert clock.now() == pytest.approx(before + 1.0)  # bridged
    m.run(COAST_SECONDS)
    assert clock.now() == pytest.approx(m.wall() + AHEAD)  # followed
    assert any("did not make up for it" in r.getMessage() for r in caplog.records)


def test_small_steps_back_hold_still_and_the_first_offset_is_followed_at_once():
    m = Machine()
    server = Server(m, server_ahead=BEHIND)
    clock = SystemClock(server, wall=m.wall, elapsed=m.elapsed)
    t0 = clock.now()  # read before any response: the local clock
    server.respond()  # the first estimate: the store is 2 minutes behind
    assert clock.now() == pytest.approx(t0 + BEHIND)  # followed at once, not held for 2 minutes
    server.clock_offset += JUMP_SECONDS / 2  # refined upwards
    t1 = clock.now()
    server.clock_offset -= JUMP_SECONDS / 2  # and back down: held still, never backwards
    assert clock.now() == t1
    m.run(JUMP_SECONDS)
    assert clock.now() == pytest.approx(m.real + BEHIND)


# -- worker processes on skewed machines, on S3 and Azure ---------------------------------


def read_log(path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return [x for x in lines if "run" in x], [x for x in lines if "clock" in x]


async def wait_until(predicate, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


class Watcher:
    """The parent's view, on real time (the moto server runs in this process, on its
    clock; Azurite on this machine's): when a schedule's fires and a waiting task's
    promotion were first seen."""

    def __init__(self, q: qo.Queue):
        self.q = q
        self.fires: dict[float, float] = {}  # last_fire_at -> real time first seen
        self.promoted: dict[str, float] = {}  # task id -> real time its marker was first seen raised
        self.fired = 0

    async def look(self, waiting: list[str]) -> None:
        s = await self.q.schedules.get("every-second")
        if s.last_fire_at is not None:
            self.fires.setdefault(s.last_fire_at, time.time())
        self.fired = s.fired
        for e in await self.q.storage.list(keys.ready_prefix(self.q.name)):
            m = keys.parse_marker(e.key)
            if m is not None and m.task_id in waiting and m.priority > 0:
                self.promoted.setdefault(m.task_id, time.time())


async def submit_phase(q: qo.Queue) -> tuple[list[str], list[str], str, float]:
    # one submit each: submit_many would put them in a pack, which one worker claims whole
    holds = [(await q.submit("hold", i)).id for i in range(6)]
    limited = [(await q.submit("limited", i)).id for i in range(12)]
    waiting = await q.submit("unhandled", priority=0)  # no worker runs it: it only waits, and ages
    return holds, limited, waiting.id, time.time()


def assert_phase(runs: list[dict], holds: list[str], limited: list[str]) -> None:
    """Each long task ran once, in its first attempt, though its lease (3 s) was renewed
    by a worker whose clock is minutes off the other's; the rate limit held."""
    by_task = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    assert all(len(by_task.get(t, [])) == 1 and by_task[t][0]["attempt"] == 1 for t in holds), \
        {t: by_task.get(t) for t in holds}
    assert len({r["pid"] for t in holds for r in by_task[t]}) == 2  # both workers held leases
    starts = sorted(by_task[t][0]["start"] for t in limited)
    assert len(starts) == 12
    # 4/s, burst 1, over any second of real time: 5, plus a batch a worker took just before
    assert max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts) <= 7
    assert starts[-1] - starts[0] >= (12 - 1 - 2) / 4  # not faster than the rate, give or take


@pytest.mark.parametrize("backend", ["s3", "azure"])
async def test_workers_minutes_apart_and_a_clock_jump_agree_on_the_stores_clock(storage_url, tmp_path):
    """Two worker+scheduler processes, one machine 2 minutes ahead, one 2 minutes behind;
    then the one ahead is set another hour forward and the one behind an hour back. On
    the store's clock they agree throughout: no long task's lease is taken from its live
    holder, the every-second schedule fires each second once (no burst, no pause, never
    early), the rate limit holds, and a waiting task ages on time."""
    q = await qo.connect(storage_url, queue="skew")
    await q.limits.set("task_type:limited", rate=4, per=1.0, burst=1)
    await q.settings.set(aging=True, aging_step_seconds=3.0, aging_step_levels=255, aging_interval=0.1)
    created = time.time()
    await q.schedules.add("every-second", cron="* * * * * *", task_type="tick")
    skews = [tmp_path / "ahead", tmp_path / "behind"]
    skews[0].write_text(str(AHEAD))
    skews[1].write_text(str(BEHIND))
    logs = [tmp_path / "ahead.jsonl", tmp_path / "behind.jsonl"]
    stop = tmp_path / "stop"
    procs = [CTX.Process(target=skew_procs.run_skewed_worker,
                         args=(storage_url, "skew", str(s), str(log), str(stop), LEASE_TTL, HOLD))
             for s, log in zip(skews, logs)]
    watcher = Watcher(q)
    phases = []
    for p in procs:
        p.start()
    try:
        async def both_up():  # each has had a response, so its worker is claiming: on a
            return all(read_log(log)[1] for log in logs)  # loaded machine they start seconds apart

        await wait_until(both_up)
        for phase in range(2):
            if phase == 1:  # the machines' clocks are set while they run
                skews[0].write_text(str(AHEAD + HOUR))
                skews[1].write_text(str(BEHIND - HOUR))
            holds, limited, waiting, submitted = await submit_phase(q)
            phases.append((holds, limited, waiting, submitted))

            async def done():
                await watcher.look([w for *_, w, _ in phases])
                runs = [r for log in logs for r in read_log(log)[0]]
                ran = {r["task"] for r in runs}
                return set(holds + limited) <= ran and waiting in watcher.promoted

            await wait_until(done)
    finally:
        stopping = time.time()  # the schedulers ran until at least now, at most until they ended
        stop.write_text("")
        for p in procs:
            p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    ended = time.time()
    runs = [r for log in logs for r in read_log(log)[0]]
    for holds, limited, _, _ in phases:
        assert_phase(runs, holds, limited)
    for log, skew in zip(logs, (AHEAD, BEHIND)):
        clocks = read_log(log)[1]
        assert clocks and all(abs(c["clock"] - c["real"]) < 2.0 for c in clocks), \
            max(clocks, key=lambda c: abs(c["clock"] - c["real"]))
        assert abs(clocks[0]["local"] - clocks[0]["real"] - skew) < 0.5  # the machine was off
        assert abs(clocks[-1]["local"] - clocks[-1]["real"] - skew - HOUR * (1 if skew > 0 else -1)) < 0.5
    for _, _, waiting, submitted in phases:  # aged after waiting 3 s of real time, not early by a skew
        assert watcher.promoted[waiting] >= submitted + 3.0 - 1.0
    # each fire time was first seen after it (never fired early) ...
    assert watcher.fires and all(seen >= at - 1.0 for at, seen in watcher.fires.items())
    # ... once per second since the schedule was made: no burst of catch-up fires, no pause
    fired = (await q.schedules.get("every-second")).fired
    assert stopping - created - 5 <= fired <= ended - created + 2
    ticks = [r for r in runs if r["run"] == "tick"]
    assert len({r["task"] for r in ticks}) == len(ticks)  # each fire's task ran once
    await q.close()


def test_a_response_during_which_the_local_clock_was_set_says_nothing_of_the_offset():
    """A request sent before the machine's clock was set back an hour and answered after
    gave an empty interval, taken as the new estimate: half an hour off (seen by the
    skewed workers above: a clock 1800 s ahead for one response)."""
    from email.utils import formatdate

    from qo.backend_kit import ServerClock

    real = 1_800_000_000.0
    sc = ServerClock()
    sc.observe(formatdate(real, usegmt=True), real - 0.1, real + 0.1)
    assert sc.offset == pytest.approx(0.4, abs=0.6)
    sc.observe(formatdate(real + 1, usegmt=True), real + 0.9, real + 1.1 - HOUR)  # set back meanwhile
    assert sc.offset == pytest.approx(0.4, abs=0.6)
    sc.observe(formatdate(real + 2, usegmt=True), real + 1.9, real + 2.1 + HOUR)  # set forward meanwhile
    assert sc.offset == pytest.approx(0.4, abs=0.6)
    sc.observe(formatdate(real + 3, usegmt=True), real + 2.9 - HOUR, real + 3.1 - HOUR)  # after: followed
    assert sc.offset == pytest.approx(HOUR + 0.4, abs=0.6)


# -- the engine on clocks that disagree or jump (every backend, fake clocks) --------------


class JumpClock(FakeClock):
    """A fake clock that can also be set back (a machine's clock, not a store's)."""

    def jump(self, seconds: float) -> None:
        self._now += seconds
        self._wake()


class Skewed:
    """``base`` seen from a machine ``skew`` seconds off."""

    def __init__(self, base: FakeClock, skew: float):
        self.base, self.skew = base, skew

    def now(self) -> float:
        return self.base.now() + self.skew

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)


async def limited_grants(limiters, task, clock, seconds: float, step: float = 0.05) -> int:
    """Grants the limiters give, taking turns asking, over ``seconds`` of ``clock``."""
    granted = 0
    for _ in range(int(seconds / step)):
        for limiter in limiters:
            granted += (await limiter.acquire(task)).granted
        clock.advance(step)
    return granted


async def test_a_rate_limit_holds_across_workers_whose_clocks_are_minutes_apart(storage_url):
    """Where clocks disagree (a directory store shared by machines off by 2 minutes each
    way): the bucket's time only moves forward, so the one behind adds no tokens for time
    the one ahead already counted: grants stay at rate x time + burst."""
    base = FakeClock()
    queues = [await qo.connect(storage_url, queue="rl", clock=Skewed(base, skew)) for skew in (AHEAD, BEHIND)]
    await queues[0].limits.set("task_type:limited", rate=2, per=1.0, burst=1)
    limiters = [qo.Worker(q).limiter for q in queues]
    for limiter in limiters:
        await limiter.refresh(force=True)
    granted = await limited_grants(limiters, queues[0].build_task("limited", None), base, 10.0)
    assert 2 * 10 - 1 <= granted <= 2 * 10 + 1
    for q in queues:
        await q.close()


async def test_a_rate_limit_grants_on_after_the_clock_is_set_back_an_hour(storage_url):
    """A clock set back an hour found the bucket's time an hour ahead and granted nothing
    until it was back (rate-limited work stood still for an hour). Now the bucket goes on
    from the clock's time, with the tokens it had; set forward, it grants one burst."""
    clock = JumpClock()
    q = await qo.connect(storage_url, queue="rl", clock=clock)
    await q.limits.set("task_type:limited", rate=2, per=1.0, burst=1)
    limiter = qo.Worker(q).limiter
    await limiter.refresh(force=True)
    task = q.build_task("limited", None)
    assert 2 * 5 - 1 <= await limited_grants([limiter], task, clock, 5.0) <= 2 * 5 + 1
    clock.jump(-HOUR)
    assert 2 * 5 - 1 <= await limited_grants([limiter], task, clock, 5.0) <= 2 * 5 + 1
    clock.jump(HOUR)
    assert 2 * 5 - 1 <= await limited_grants([limiter], task, clock, 5.0) <= 2 * 5 + 1 + 1  # + the burst
    await q.close()


async def fire_passes(scheduler, clock, seconds: float, step: float = 5.0) -> list:
    fired = []
    for _ in range(int(seconds / step)):
        fired += await scheduler.run_once()
        clock.advance(step)
    return fired


async def test_a_schedule_after_the_clock_is_set_forward_fires_once_not_a_burst(storage_url):
    """An hour forward: the scheduler's catch-up policy ("latest", the default) fires the
    most recent missed time once and the times within the grace, not the 60 missed
    minutes; then once a minute again."""
    from qo.scheduler import Scheduler

    clock = JumpClock(1_800_000_000.0 - 1_800_000_000.0 % 60 + 1)
    q = await qo.connect(storage_url, queue="sched", clock=clock)
    await q.schedules.add("minutely", cron="* * * * *", task_type="tick")
    scheduler = Scheduler(q)
    assert len(await fire_passes(scheduler, clock, 185)) == 3
    clock.jump(HOUR)
    burst = await scheduler.run_once()
    assert 1 <= len(burst) <= 2  # the latest missed minute (and the one due now)
    clock.advance(5)
    assert len(await fire_passes(scheduler, clock, 185)) == 3
    fire_times = [f.fire_at for f in burst]
    assert len(set(fire_times)) == len(fire_times)
    await q.close()


async def test_a_schedule_after_the_clock_is_set_back_fires_no_time_twice(storage_url):
    """Set back, on a store whose clock it is (a directory store: the machine's
    clock): the times of the hour come round again, but each was fired already. The
    schedule fires none of them twice and resumes at its first time not fired. (On S3 and
    Azure a worker's clock set back is not the store's: the schedule goes on firing, as
    test_workers_minutes_apart_and_a_clock_jump_agree_on_the_stores_clock shows.)"""
    from qo.scheduler import Scheduler

    clock = JumpClock(1_800_000_000.0 - 1_800_000_000.0 % 60 + 1)
    q = await qo.connect(storage_url, queue="sched", clock=clock)
    await q.schedules.add("minutely", cron="* * * * *", task_type="tick")
    scheduler = Scheduler(q)
    before = await fire_passes(scheduler, clock, 185)
    clock.jump(-120)  # two minutes here; an hour is the same, an hour long
    again = await fire_passes(scheduler, clock, 190)
    assert {f.fire_at for f in before} & {f.fire_at for f in again} == set()
    assert len(again) == 1  # once the clock passed the last time fired: the next one
    assert len([t async for t in q.list(task_type="tick")]) == len(before) + len(again) == 4
    await q.close()


async def run_two_workers_apart(storage_url: str, skew: float) -> list[tuple[str, int]]:
    """Two workers whose clocks are ``2 x skew`` apart (a directory store shared by two
    machines, or any store when the clock is given) run 4 tasks of 45 s each on 30 s
    leases, on a clock ticking 20x real time; returns (task id, attempt) per run."""
    base = FakeClock()
    queues = [await qo.connect(storage_url, queue="apart", clock=Skewed(base, s)) for s in (skew, -skew)]
    for i in range(4):
        await queues[0].submit("hold", i)
    runs: list[tuple[str, int]] = []

    async def hold(input, ctx):
        runs.append((ctx.task.id, ctx.task.attempt))
        await base.sleep(45.0)

    workers = []
    for q in queues:
        w = qo.Worker(q, concurrency=2, lease_ttl=30.0, sweep_interval=1.0, poll_min=0.5, poll_max=2.0)
        w.handler("hold")(hold)
        workers.append(w)

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.01)
            base.advance(0.2)

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.wait_for(asyncio.gather(*(w.run(until_idle=True) for w in workers)), 120)
    finally:
        ticker.cancel()
        for q in queues:
            await q.close()
    return runs


async def test_workers_seconds_apart_keep_their_leases_where_clocks_are_their_own(storage_url):
    """What a store without a clock of its own (a directory store shared by machines)
    tolerates: clocks apart by less than lease_ttl minus the heartbeat interval (30 - 10 s
    here; 8 s apart): no lease is taken from its live holder."""
    runs = await run_two_workers_apart(storage_url, 4.0)
    assert sorted(a for _, a in runs) == [1, 1, 1, 1]


@pytest.mark.parametrize("backend", ["local"])
async def test_workers_a_lease_apart_lose_leases_where_clocks_are_their_own(storage_url):
    """And the limit is real: 40 s apart on 30 s leases, the one ahead finds the other's
    heartbeats stale and takes its tasks over (each still ends once: the holder's late
    outcome is refused). Why a directory store must not be shared by machines whose
    clocks are not synchronised (docs/architecture.md §7)."""
    runs = await run_two_workers_apart(storage_url, 20.0)
    assert len(runs) > 4 and max(a for _, a in runs) > 1


async def test_on_a_directory_store_qo_follows_the_local_clock(tmp_path, monkeypatch):
    """A local directory store has no clock to follow: qo's clock is the process's own
    (one machine has one clock; machines sharing the directory must keep theirs in step)."""
    real = time.time
    # ids made on the clock ahead must not stay ahead for the process's later tests (the
    # id counters never go back: a task id after them would sort before a pack's)
    monkeypatch.setattr(keys, "_id_last", list(keys._id_last))
    monkeypatch.setattr(keys, "_pack_last", list(keys._pack_last))
    monkeypatch.setattr(time, "time", lambda: real() + AHEAD)
    q = await qo.connect(str(tmp_path / "store"), queue="q")
    await q.submit("t", None)
    assert not getattr(q.storage, "clock_offset", 0.0)
    assert abs(q.clock.now() - (real() + AHEAD)) < 1.0
    await q.close()


async def marker_levels(q) -> list[int]:
    return sorted(m.priority for e in await q.storage.list(keys.ready_prefix(q.name))
                  if (m := keys.parse_marker(e.key)) is not None)


async def test_aging_by_a_clock_set_back_moves_nothing_and_then_ages_by_the_clock(storage_url):
    """A waiting task's age is the clock's time since it came due: a clock set back an
    hour sees negative waits, which age nothing (and lower nothing); set forward, it ages
    by the store's time, the jump included (a directory store's clock moved: the tasks did
    wait that long by it)."""
    from qo.aging import AgingSettings, age_ready

    clock = JumpClock()
    q = await qo.connect(storage_url, queue="aging", clock=clock)
    for p in (0, 64):
        await q.submit("t", None, priority=p)
    aging = AgingSettings(step_seconds=60.0, step_levels=32, cap=255)
    clock.jump(-HOUR)
    await age_ready(q.store, q.plugins, aging, clock.now())
    assert await marker_levels(q) == [0, 64]
    clock.jump(HOUR + 60)  # back, and a minute on: one step, less than a marker moves by
    await age_ready(q.store, q.plugins, aging, clock.now())
    assert await marker_levels(q) == [0, 64]
    clock.jump(HOUR)  # forward an hour: waited that long by the clock, so at the cap
    await age_ready(q.store, q.plugins, aging, clock.now())
    assert await marker_levels(q) == [255, 255]
    await q.close()
