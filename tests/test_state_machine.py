"""Property-based tests of the task state machine (issue #10), on real storage.

A ``RuleBasedStateMachine`` drives one queue on a fake clock through random sequences
of what producers, workers and the sweep do, calling the engine's own building blocks
the way ``qo/worker.py`` does (``claim`` from a listed ready marker after announcing
the lease, ``finish`` with ``completed`` / ``failed`` / ``handed_back``, then the
marker, then releasing the lease), plus the queue's ``submit`` / ``cancel`` /
``retry``, heartbeats (``LeaseBook.write``), lease expiry and ``sweep``, promotion of
delayed markers, and crashes: a simulated worker that forgets everything, possibly
between a task CAS and its marker write. A worker that is not heartbeated simply goes
silent and, once swept, is a zombie whose late results must be refused.

A model (task id -> expected status, attempt, output) is updated from what every
operation returns and checked against storage after every step (see ``_check``).

The heavy run (150 examples of up to 50 steps, about 15-25 s) uses the local backend:
a step is a handful of file operations, and hypothesis's swarm testing (each example
enables a random subset of rules) needs many examples to reach deep interleavings. The
same machine runs 6 short examples on S3 (moto), where every request is an HTTP round
trip (about 15 s), so that the backend's conditional writes are covered too. Examples
are derandomized and the example database is off: CI runs the same sequences each time.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import qo
from qo import keys
from qo.clock import FakeClock, utc
from qo.errors import Fail, TaskStateError
from qo.leases import LeaseBook, sweep
from qo.model import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, STATUSES, TERMINAL
from qo.promotion import promote_due
from qo.transitions import Claimed, claim, completed, failed, finish, handed_back

TTL = 30.0
N_WORKERS = 3
PICK = st.integers(0, 10_000)


class SimWorker:
    """One simulated worker process: its lease book and the attempts it holds."""

    def __init__(self, machine: "StateMachine", slot: int):
        machine.generation += 1
        self.id = f"w{slot}-g{machine.generation}"
        self.book = LeaseBook(machine.q.store, self.id, machine.clock, TTL)
        self.held: list[tuple[Any, str]] = []  # (task as claimed, etag): attempts in flight
        self.trash: list[str] = []  # claimed markers awaiting the batched delete


class StateMachine(RuleBasedStateMachine):
    url_factory: Any = None  # set per backend

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.url, self.cleanup = type(self).url_factory()
        self.clock = FakeClock()
        self.q = self.run(qo.connect(self.url, queue="sm", clock=self.clock))
        self.generation = 0
        self.lease_seq = itertools.count()
        self.workers = [SimWorker(self, i) for i in range(N_WORKERS)]
        self.model: dict[str, dict[str, Any]] = {}
        self.ids: list[str] = []

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            if getattr(self, "q", None) is not None:
                self.run(self._full_recovery())
        finally:
            try:
                self.run(self.q.close())
            finally:
                self.loop.close()
                self.cleanup()

    # -- helpers --------------------------------------------------------------------

    def _expect(self, task, *, allow_reset: bool = False, allow_handback: bool = False) -> None:
        """Record a transition we observed; check it against what the model allows."""
        m = self.model[task.id]
        if m["status"] == COMPLETED:
            raise AssertionError(f"completed task {task.id} changed to {task.status}")
        if task.attempt < m["attempt"]:
            ok = (allow_reset and task.attempt == 0) or (allow_handback and task.attempt == m["attempt"] - 1)
            assert ok, f"attempt of {task.id} went from {m['attempt']} to {task.attempt}"
        m["status"], m["attempt"] = task.status, task.attempt
        m["output"] = task.output if task.status == COMPLETED else None

    def _pick(self, pick: int, status: str | None = None) -> str | None:
        ids = [i for i in self.ids if status is None or self.model[i]["status"] == status]
        return ids[pick % len(ids)] if ids else None

    def _take(self, w: SimWorker, pick: int) -> tuple[Any, str] | None:
        if not w.held:
            return None
        return w.held.pop(pick % len(w.held))

    async def _tasks(self) -> dict[str, Any]:
        entries = await self.q.store.list(keys.tasks_prefix(self.q.name))
        out = {}
        for e in entries:
            tid = e.key.rsplit("/", 1)[-1].removesuffix(".json")
            out[tid] = (await self.q.store.load(tid))[0]
        return out

    async def _records(self) -> dict[str, dict[str, Any]]:
        import json

        out = {}
        for e in await self.q.store.list(keys.workers_prefix(self.q.name)):
            try:
                blob = await self.q.storage.get(e.key)
            except qo.errors.NotFound:
                continue
            rec = json.loads(blob.data)
            out[rec["worker_id"]] = rec
        return out

    async def _markers(self) -> set[str]:
        ready = await self.q.store.list(keys.ready_prefix(self.q.name))
        delayed = await self.q.store.list(keys.delayed_prefix(self.q.name))
        return {e.key for e in ready + delayed}

    def _marker_keys(self, task) -> tuple[str, str]:
        return (keys.ready(self.q.name, task.priority, task.available_at, task.id, task.task_type),
                keys.delayed(self.q.name, task.priority, task.available_at, task.id, task.task_type))

    # -- rules: producers and the queue API ---------------------------------------------

    @initialize(first=st.lists(st.tuples(st.sampled_from([None, 0.0, 5.0]), st.integers(0, 2)),
                               min_size=1, max_size=4))
    def start(self, first) -> None:
        for w in self.workers:
            self.run(w.book.write())  # every worker starts with a record, as a real one does
        for delay, max_retries in first:
            self.submit(delay, max_retries)

    @rule(delay=st.sampled_from([None, 0.0, 5.0, 40.0]), max_retries=st.integers(0, 2))
    def submit(self, delay, max_retries):
        when = None if delay is None else utc(self.clock.now()) + timedelta(seconds=delay)
        task = self.run(self.q.submit("t", {"n": len(self.ids)}, schedule_at=when, max_retries=max_retries))
        assert task.status == PENDING and task.attempt == 0
        self.model[task.id] = {"status": PENDING, "attempt": 0, "output": None, "max_retries": max_retries}
        self.ids.append(task.id)

    @precondition(lambda self: self.ids)
    @rule(pick=PICK)
    def cancel(self, pick):
        tid = self._pick(pick)
        if tid is None:
            return
        before = self.model[tid]["status"]
        try:
            task = self.run(self.q.cancel(tid))
        except TaskStateError:
            assert before in TERMINAL and before != FAILED
            return
        assert before not in TERMINAL or before == FAILED  # a dead letter is given up on
        if before == RUNNING:
            assert task.status == RUNNING and task.cancel_requested
        else:
            assert task.status == CANCELLED
        self._expect(task)

    @precondition(lambda self: any(m["status"] in (FAILED, CANCELLED) for m in self.model.values()))
    @rule(pick=PICK)
    def retry(self, pick):
        tid = self._pick(pick)
        if tid is None:
            return
        before = self.model[tid]["status"]
        try:
            task = self.run(self.q.retry(tid))
        except TaskStateError:
            assert before not in (FAILED, CANCELLED)
            return
        assert before in (FAILED, CANCELLED)
        assert task.status == PENDING and task.attempt == 0 and not task.cancel_requested
        self._expect(task, allow_reset=True)


    # -- rules: workers -----------------------------------------------------------------

    @precondition(lambda self: any(m["status"] == PENDING for m in self.model.values()))
    @rule(slot=st.integers(0, N_WORKERS - 1), pick=PICK)
    def claim(self, slot, pick):
        """List ready/, announce a fresh lease for one marker, claim it (qo/worker.py)."""
        w = self.workers[slot]
        listed = self.run(self.q.store.list(keys.ready_prefix(self.q.name)))
        markers = [keys.parse_marker(e.key) for e in listed]
        holding = {t.id for t, _ in w.held}  # as qo/worker.py: never re-announce a task we run
        markers = [m for m in markers if m is not None and m.key not in w.trash and m.task_id not in holding]
        if not markers:
            return
        marker = markers[pick % len(markers)]
        lease = f"L{next(self.lease_seq)}"
        self.run(w.book.announce({marker.task_id: {"lease": lease, "type": marker.task_type}}))
        now = self.clock.now()
        result = self.run(claim(self.q.store, marker, worker_id=w.id, lease_id=lease, lease_ttl=TTL, now=now))
        if isinstance(result, Claimed):
            assert self.model[marker.task_id]["status"] == PENDING
            assert result.task.attempt == self.model[marker.task_id]["attempt"] + 1
            self._expect(result.task)
            event("claimed")
            w.held.append((result.task, result.etag))
            w.trash.append(marker.key)
            return
        w.book.release(marker.task_id)
        if result.stale and now - marker.due > qo.queue.ORPHAN_GRACE_SECONDS:
            w.trash.append(marker.key)  # old and wrong: the worker drops it

    @rule(slot=st.integers(0, N_WORKERS - 1))
    def flush_trash(self, slot):
        w = self.workers[slot]
        batch, w.trash = w.trash, []
        self.run(self.q.store.delete_markers(batch))

    async def _end(self, w: SimWorker, task, etag, change, *, write_marker: bool) -> Any:
        """finish(), then (unless the worker crashes here) the marker, then the release."""
        now = self.clock.now()
        lease = task.lease_id
        stored = await finish(self.q.store, task, etag, change, now)
        if stored is None:
            current, _ = await self.q.store.load(task.id)
            assert not (current.status == RUNNING and current.lease_id == lease), \
                "finish refused a result although our lease still holds"
            w.book.release(task.id)  # as qo/worker.py: the attempt is over
            event("late result refused (lease taken over)")
            return None
        if write_marker and stored[0].status == PENDING:
            await self.q.store.put_marker(stored[0].marker_key(self.q.name, now))
        return stored[0]

    @precondition(lambda self: any(w.held for w in self.workers))
    @rule(slot=st.integers(0, N_WORKERS - 1), pick=PICK,
          how=st.sampled_from(["complete", "retry-now", "retry-later", "fail", "exhaust", "hand-back"]),
          crash=st.booleans())
    def end_attempt(self, slot, pick, how, crash):
        """One attempt in flight ends, on one of the workers holding attempts."""
        busy = [i for i, w in enumerate(self.workers) if w.held]
        slot = busy[slot % len(busy)]
        if how == "complete":
            self.complete(slot, pick, crash)
        elif how == "hand-back":
            self.hand_back(slot, pick, crash)
        else:
            self.fail(slot, pick, how, crash)

    def complete(self, slot, pick, crash):
        w = self.workers[slot]
        held = self._take(w, pick)
        if held is None:
            return
        task, etag = held
        out = f"out-{task.id}-{task.attempt}"
        stored = self.run(self._end(w, task, etag, completed(out, self.clock.now()), write_marker=False))
        if stored is None:
            return
        assert stored.status == COMPLETED and stored.output == out
        event("completed")
        self._expect(stored)
        if crash:
            self._crash(slot)
        else:
            w.book.release(task.id)

    def fail(self, slot, pick, kind, crash):
        """An attempt fails: a retry (now or later) unless the attempts are used up,
        ``qo.Fail``, or ``exhaust``: the default policy's answer (dead letter once
        attempt > max_retries, else a retry a few seconds later); ``crash``: the worker
        dies between the task CAS and the marker write."""
        w = self.workers[slot]
        held = self._take(w, pick)
        if held is None:
            return
        task, etag = held
        error: BaseException = Fail("no") if kind == "fail" else RuntimeError("boom")
        delay = -1 if kind == "fail" or task.attempt > task.max_retries else (0.0 if kind == "retry-now" else 5.0)
        if kind == "exhaust":
            delay = self.q.plugins.hook.qo_retry_delay(task=task, error=error)
        stored = self.run(self._end(w, task, etag, failed(error, delay, self.clock.now()), write_marker=not crash))
        if stored is None:
            return
        if stored.cancel_requested:
            assert stored.status == CANCELLED
        elif delay < 0:
            assert stored.status == FAILED
        else:
            assert stored.status == PENDING and stored.attempt == task.attempt
        self._expect(stored)
        event(f"failed -> {stored.status}" + (" + crash before marker" if crash else ""))
        if crash:
            self._crash(slot)
        else:
            w.book.release(task.id)

    def hand_back(self, slot, pick, crash):
        """Graceful shutdown of one attempt: pending again, the attempt not counted."""
        w = self.workers[slot]
        held = self._take(w, pick)
        if held is None:
            return
        task, etag = held
        attempt = task.attempt
        stored = self.run(self._end(w, task, etag, handed_back(self.clock.now()), write_marker=not crash))
        if stored is None:
            return
        if stored.cancel_requested:  # a cancel asked while it ran: it ends here
            assert stored.status == CANCELLED and stored.attempt == attempt
        else:
            assert stored.status == PENDING and stored.attempt == attempt - 1
        self._expect(stored, allow_handback=True)
        if crash:
            self._crash(slot)
        else:
            w.book.release(task.id)

    def _crash(self, slot: int) -> None:
        """The process dies: its record stays (and goes stale); a new process takes the slot."""
        self.workers[slot] = SimWorker(self, slot)
        self.run(self.workers[slot].book.write())

    @rule(slot=st.integers(0, N_WORKERS - 1))
    def crash(self, slot):
        self._crash(slot)

    # -- rules: time and recovery ------------------------------------------------------

    @rule(seconds=st.sampled_from([0.0, 0.001, 1.0, 6.0, 12.0]), beating=st.sets(st.integers(0, N_WORKERS - 1)),
          promote=st.booleans())
    def tick(self, seconds, beating, promote):
        """Time passes; some workers heartbeat; maybe a promotion pass runs."""
        self.clock.advance(seconds)
        for i in sorted(beating):
            self.run(self.workers[i].book.write())
        if promote:
            self.run(promote_due(self.q.store, self.clock.now()))

    @rule(sweeper=st.integers(0, N_WORKERS - 1), expire=st.sampled_from(["no", "yes", "yes", "everyone dies"]),
          beating=st.sets(st.integers(0, N_WORKERS - 1)))
    def sweep(self, sweeper, expire, beating):
        """Optionally let every lease not renewed now expire, then sweep as ``sweeper``;
        or every worker dies, and a full recovery must leave no task lost."""
        if expire == "everyone dies":
            self.run(self._full_recovery())
            return
        if expire == "yes":
            for i in sorted(beating):
                self.run(self.workers[i].book.write())
            self.clock.advance(TTL + 1)
        self.run(self._sweep(self.workers[sweeper].id))

    async def _sweep(self, self_id: str, max_records: int = 20) -> None:
        before = await self._tasks()
        report = await sweep(self.q.store, self.clock, self_id=self_id, max_records=max_records)
        after = await self._tasks()
        for tid, task in after.items():
            if tid in report.recovered:
                old = before[tid]
                assert old.status == RUNNING, f"sweep recovered {tid}, which was {old.status}"
                assert task.status in (PENDING, FAILED, CANCELLED) and task.attempt == old.attempt
                if task.status == FAILED:
                    assert task.attempt > task.max_retries
                self._expect(task)
                event(f"sweep recovered -> {task.status}")
            else:
                assert task.status == before[tid].status and task.attempt == before[tid].attempt

    async def _full_recovery(self) -> None:
        """Every worker dies; once every lease is past, one sweep of all records and one
        promotion leave every pending task with its canonical marker, and nothing running."""
        for i in range(N_WORKERS):
            self.workers[i] = SimWorker(self, i)  # forget, write nothing
        self.clock.advance(TTL + 1)
        await self._sweep("observer", max_records=1000)
        await promote_due(self.q.store, self.clock.now())
        await self._check()
        assert await self._records() == {}
        markers = await self._markers()
        for tid, task in (await self._tasks()).items():
            assert task.status != RUNNING, f"{tid} still running with every worker dead and swept"
            if task.status == PENDING:
                assert task.marker_key(self.q.name, self.clock.now()) in markers, f"pending {tid} lost its marker"


    # -- invariants ------------------------------------------------------------------

    @invariant()
    def consistent(self):
        self.run(self._check())

    async def _check(self) -> None:
        tasks = await self._tasks()
        assert set(tasks) == set(self.model), "a task appeared or vanished"
        records = await self._records()
        named: dict[str, list[tuple[str, str]]] = {}
        for wid, rec in records.items():
            for tid, lease in (rec.get("leases") or {}).items():
                named.setdefault(tid, []).append((wid, lease.get("lease")))
        markers = await self._markers()
        for tid, task in tasks.items():
            m = self.model[tid]
            assert task.status in STATUSES
            assert task.status == m["status"], f"{tid} is {task.status}, the model says {m['status']}"
            assert task.attempt == m["attempt"], f"{tid} attempt {task.attempt}, the model says {m['attempt']}"
            if task.status == COMPLETED:
                assert task.output == m["output"] and task.lease_id is None
            if task.status == RUNNING:
                assert (task.worker_id, task.lease_id) in named.get(tid, []), \
                    f"running {tid} ({task.worker_id}, {task.lease_id}) is named by no worker record: {named.get(tid)}"
            if task.status == PENDING:
                assert not task.cancel_requested, f"pending {tid} still carries a cancel request"
                assert set(self._marker_keys(task)) & markers or tid in named, \
                    f"pending {tid} has no marker and no worker record names it"
            if task.status == FAILED:
                assert task.attempt > task.max_retries or (task.last_error or {}).get("type") == "Fail", \
                    f"{tid} dead-lettered after {task.attempt} attempts of {task.max_retries + 1}"


def local_storage():
    d = tempfile.mkdtemp(prefix="qo-sm-")
    return d + "/store", lambda: shutil.rmtree(d, ignore_errors=True)


class LocalMachine(StateMachine):
    url_factory = staticmethod(local_storage)


TestStateMachineLocal = LocalMachine.TestCase
TestStateMachineLocal.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_state_machine_s3(moto_server):
    """Fewer, shorter runs on S3: each step is several HTTP requests to moto."""

    class S3Machine(StateMachine):
        url_factory = staticmethod(lambda: (moto_server.new_bucket(prefix="sm"), lambda: None))

    run_state_machine_as_test(S3Machine, settings=settings(
        max_examples=4, stateful_step_count=20, deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


# -- regressions found by the machine -------------------------------------------------


async def test_a_second_marker_of_a_task_we_run_does_not_unname_it_in_our_record(tmp_path):
    """A worker running T listed another ready marker of T (an aging leftover: same due
    time at another level), re-announced T under a fresh lease (replacing the running
    attempt's lease in its record), missed the claim and released T: its record no
    longer named T. Had it died then, no sweep could find T: running forever."""
    import json

    from clocks import ticking_queue
    from qo.worker import Worker

    async with ticking_queue(str(tmp_path / "s"), "stale", speed=1.0) as (q, clock):
        task = await q.submit("t", None)
        started, release = asyncio.Event(), asyncio.Event()
        w = Worker(q, concurrency=2, poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.1)

        @w.handler("t")
        async def t(input, ctx):
            started.set()
            await release.wait()

        run = asyncio.create_task(w.run())
        await asyncio.wait_for(started.wait(), 10)
        await q.storage.put(keys.ready(q.name, 255, task.available_at, task.id, task.task_type), b"")
        listings = 0
        refill = w.feed.refill

        async def counted(now):
            nonlocal listings
            listings += 1
            return await refill(now)

        w.feed.refill = counted
        while listings < 5:  # the leftover is listed again and again
            await asyncio.sleep(0.01)
        await w.book.write()
        record = json.loads((await q.storage.get(w.book.key)).data)
        running = await q.get(task.id)
        assert running.status == RUNNING
        assert record["leases"].get(task.id, {}).get("lease") == running.lease_id
        release.set()
        w.stop()
        await run


async def test_a_task_handed_back_after_its_cancel_was_requested_ends_cancelled(tmp_path):
    """A graceful shutdown handed a running task back to pending although its cancel was
    requested: the cancelled task ran again (and pending carried cancel_requested)."""
    from clocks import ticking_queue
    from qo.worker import Worker

    async with ticking_queue(str(tmp_path / "s"), "cxl", speed=1.0) as (q, clock):
        task = await q.submit("t", None)
        started = asyncio.Event()
        w = Worker(q, concurrency=1, poll_min=0.01, poll_max=0.05, sweep_interval=0.2, shutdown_timeout=0.05)

        @w.handler("t")
        async def t(input, ctx):
            started.set()
            await asyncio.Event().wait()  # never ends by itself

        run = asyncio.create_task(w.run())
        await asyncio.wait_for(started.wait(), 10)
        assert (await q.cancel(task.id)).cancel_requested
        w.stop()
        await run
        done = await q.get(task.id)
        assert done.status == CANCELLED and not w.stats["handed_back"]
        assert await q.storage.list(keys.ready_prefix(q.name)) == []
