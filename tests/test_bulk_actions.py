"""Bulk actions (issue 16, item 4): ``queue.retry_many`` / ``qo retry --all-failed`` and
``queue.cancel_many`` / ``qo cancel --status pending|blocked|running``, on every backend."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re

import pytest
from click.testing import CliRunner, Result

import qo
from clocks import ticking_queue
from qo import keys
from qo.cli import cli
from qo.clock import utc
from qo.counting import CountingStorage
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5)


def qo_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


async def fail_some(q: qo.Queue, bad: dict[str, int], ok: int = 0, *, healed: set | None = None) -> dict[str, list]:
    """``ok`` completed tasks, and ``bad[type]`` dead letters of each type (max_retries=0);
    a task whose type is in ``healed`` completes instead (a later run, after a fix)."""
    made = {"ok": await q.submit_many([("ok", i) for i in range(ok)])}
    for task_type, n in bad.items():
        made[task_type] = [await q.submit(task_type, i, max_retries=0) for i in range(n)]
    await drain(q, set(bad), healed or set())
    return made


async def drain(q: qo.Queue, bad_types: set[str], healed: set[str]) -> None:
    w = Worker(q, concurrency=8, **FAST)
    w.handler("ok")(lambda input: input)
    for task_type in bad_types:
        w.handler(task_type)(_flaky(task_type in healed))
    await asyncio.wait_for(w.run(until_idle=True), 60)


def _flaky(healed: bool):
    def handler(input):
        if not healed:
            raise ValueError(f"boom {input}")
        return {"fixed": input}
    return handler


async def statuses(q: qo.Queue, tasks: list) -> list[str]:
    return [(await q.get(t.id)).status for t in tasks]


async def ids(q: qo.Queue, status: str, task_type: str | None = None) -> set[str]:
    return {t.id async for t in q.list(status=status, task_type=task_type, limit=None)}


async def marker_keys(q: qo.Queue) -> list[str]:
    out = []
    for prefix in (keys.ready_prefix(q.name), keys.delayed_prefix(q.name)):
        out += [e.key for e in await q.storage.list(prefix)]
    return sorted(out)


async def all_objects(q: qo.Queue) -> set[tuple[str, str]]:
    return {(e.key, e.etag) for e in await q.storage.list(f"{q.name}/", limit=100_000)}


# -- retry_many ---------------------------------------------------------------------------


async def test_retry_many_retries_exactly_the_failed_ones_and_they_run_again(queue):
    made = await fail_some(queue, {"bad": 4, "other": 2}, ok=12)
    calls: list[tuple[int, int]] = []
    assert await queue.retry_many(task_type="bad", progress=lambda d, n: calls.append((d, n))) == 4
    assert await statuses(queue, made["bad"]) == ["pending"] * 4
    assert all(t.attempt == 0 for t in [await queue.get(t.id) for t in made["bad"]])
    assert await statuses(queue, made["other"]) == ["failed"] * 2
    assert await statuses(queue, made["ok"]) == ["completed"] * 12
    assert await ids(queue, "failed") == {t.id for t in made["other"]}  # the index follows
    assert [d for d, _ in calls] == [1, 2, 3, 4] and calls[-1][1] == 4

    await drain(queue, {"bad", "other"}, healed={"bad"})  # fixed: they complete this time
    assert await statuses(queue, made["bad"]) == ["completed"] * 4
    assert [(await queue.get(t.id)).output for t in made["bad"]] == [{"fixed": i} for i in range(4)]
    assert await queue.retry_many() == 2  # every type, "failed" by default
    assert await ids(queue, "pending") == {t.id for t in made["other"]}
    assert await queue.retry_many() == 0  # nothing failed any more


async def test_retry_many_since_and_other_statuses(queue):
    early = (await fail_some(queue, {"bad": 2}))["bad"]
    ended = max([(await queue.get(t.id)).finished_at for t in early])
    # the queue's clock never goes back, so after its server offset is refined (Azure's
    # Date headers) it may stand still for a moment: wait until it is past the early ends
    for _ in range(200):
        if queue.clock.now() > ended + 0.002:
            break
        await asyncio.sleep(0.01)
    bound = queue.clock.now()
    late = (await fail_some(queue, {"bad": 3}))["bad"]
    assert await queue.retry_many("failed", "bad", since=bound) == 3
    assert await statuses(queue, late) == ["pending"] * 3
    assert await statuses(queue, early) == ["failed"] * 2
    assert await queue.retry_many("failed", since=dt.timedelta(hours=1)) == 2
    # cancelled ones too; expired is accepted (none here)
    gone = await queue.submit_many([("x", i) for i in range(3)])
    for t in gone:
        await queue.cancel(t.id)
    assert await queue.retry_many("expired") == 0
    assert await queue.retry_many("cancelled", task_type="x") == 3
    assert await statuses(queue, gone) == ["pending"] * 3


async def test_retry_many_expired(storage_url):
    async with ticking_queue(storage_url, "exp") as (q, clock):
        deadline = utc(clock.now() + 60)
        late = [await q.submit("t", i, expires_at=deadline) for i in range(3)]
        other = await q.submit("u", 0, expires_at=deadline)
        clock.advance(120)  # no worker looked at them in time
        await drain(q, {"t", "u"}, healed={"t", "u"})
        assert await statuses(q, late + [other]) == ["expired"] * 4
        assert await q.retry_many("expired", "t") == 3
        again = [await q.get(t.id) for t in late]
        assert [(t.status, t.expires_at) for t in again] == [("pending", None)] * 3  # a fresh chance
        await drain(q, {"t", "u"}, healed={"t", "u"})
        assert await statuses(q, late + [other]) == ["completed"] * 3 + ["expired"]


async def test_a_task_changed_after_the_listing_is_skipped_not_counted(queue):
    failed = (await fail_some(queue, {"bad": 4}))["bad"]
    victim = failed[1].id
    listing = queue.list

    async def racing_list(**kw):  # someone retries the victim after we read it
        async for task in listing(**kw):
            if task.id == victim:
                await queue.retry(victim)
            yield task

    queue.list = racing_list
    assert await queue.retry_many() == 3
    assert await statuses(queue, failed) == ["pending"] * 4
    assert len([k for k in await marker_keys(queue) if victim in k]) == 1  # retried once, not twice

    pending = await queue.submit_many([("p", i) for i in range(4)])
    victim = pending[2].id  # ... and someone cancels this one after we read it

    async def racing_cancel(**kw):
        async for task in listing(**kw):
            if task.id == victim:
                await queue.cancel(victim)
            yield task

    queue.list = racing_cancel
    assert await queue.cancel_many("pending", "p") == 3
    assert await statuses(queue, pending) == ["cancelled"] * 4


# -- cancel_many --------------------------------------------------------------------------


async def test_cancel_many_pending_of_one_type_leaves_the_others(queue):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    a = await queue.submit_many([("a", i) for i in range(5)] + [("a", 9, {"schedule_at": later})])
    b = await queue.submit_many([("b", i) for i in range(4)] + [("b", 9, {"schedule_at": later})])
    b_markers = [k for k in await marker_keys(queue) if k.endswith("-b")]
    assert len(b_markers) == 2  # a pack of four (submit_many's bulk path), one delayed task
    calls: list[tuple[int, int]] = []
    assert await queue.cancel_many("pending", "a", progress=lambda d, n: calls.append((d, n))) == 6
    assert await statuses(queue, a) == ["cancelled"] * 6  # due and delayed alike
    assert await statuses(queue, b) == ["pending"] * 5
    assert await marker_keys(queue) == b_markers  # a's markers gone, b's untouched
    assert await ids(queue, "cancelled") == {t.id for t in a}
    assert [d for d, _ in calls] == list(range(1, 7))
    assert await queue.cancel_many("pending", "a") == 0

    fresh = await queue.submit_many([("b", i) for i in range(2)])
    # "created" is the time in the task id (the producer's clock, to the millisecond)
    bound = keys.id_time(fresh[0].id)
    assert await queue.cancel_many(task_type="b", since=bound) == 2  # created since: only these
    assert await statuses(queue, fresh) == ["cancelled"] * 2
    assert await statuses(queue, b) == ["pending"] * 5


async def test_cancel_many_blocked_releases_dependents_by_their_policy(queue):
    parent = await queue.submit("p", {})
    kids = [await queue.submit("c", i, depends_on=[parent.id]) for i in range(3)]
    grand = {policy: await queue.submit("d", policy, depends_on=[kid.id], on_dependency_failure=policy)
             for kid, policy in zip(kids, ("fail", "skip", "run"))}
    assert await statuses(queue, kids + list(grand.values())) == ["blocked"] * 6
    assert await queue.cancel_many("blocked", "c") == 3
    assert await statuses(queue, kids) == ["cancelled"] * 3
    assert {p: (await queue.get(t.id)).status for p, t in grand.items()} == \
        {"fail": "failed", "skip": "skipped", "run": "pending"}
    assert (await queue.get(parent.id)).status == "pending"
    assert await ids(queue, "blocked") == set()
    assert await ids(queue, "pending") == {parent.id, grand["run"].id}


async def test_cancel_many_running_asks_them_to_stop(queue):
    started, release = asyncio.Event(), asyncio.Event()
    w = Worker(queue, concurrency=2, **FAST)

    @w.handler("slow")
    async def slow(input):
        started.set()
        await release.wait()
        raise ValueError("stopped")  # would be retried (max_retries 3) were it not cancelled

    task = await queue.submit("slow", {})
    run = asyncio.create_task(w.run(until_idle=True))
    try:
        await asyncio.wait_for(started.wait(), 30)
        assert await queue.cancel_many("running", "other") == 0
        assert await queue.cancel_many("running", "slow") == 1
        assert (await queue.get(task.id)).cancel_requested
        assert await queue.cancel_many("running") == 0  # asked already: nothing changed
    finally:
        release.set()
        await asyncio.wait_for(run, 30)
    done = await queue.get(task.id)
    assert (done.status, done.attempt) == ("cancelled", 1)


async def test_the_cost_is_the_listing_plus_four_requests_a_task(storage_url):
    q = await qo.connect(storage_url, queue="q", wrap_storage=CountingStorage)
    try:
        await fail_some(q, {"bad": 3}, ok=20)  # the completed history costs nothing here
        q.storage.reset()
        assert await q.retry_many() == 3
        # one LIST of ended/failed/ and a GET per row; then GET, marker PUT, CAS, ended/ delete
        assert q.storage.counts() == {"LIST": 1, "GET": 3 + 3, "PUT": 3, "PUT_COND": 3, "DELETE_BATCH": 3}
        await q.submit_many([("x", i) for i in range(3)], bulk=False)
        q.storage.reset()
        assert await q.cancel_many("pending", "x") == 3
        # the LISTs of ready/ and delayed/ and a GET per row; then GET, ended/ PUT, CAS, markers' delete
        assert q.storage.counts() == {"LIST": 2, "GET": 3 + 3, "PUT": 3, "PUT_COND": 3, "DELETE_BATCH": 3}
        await q.submit_many([("y", i) for i in range(3)])  # one pack
        q.storage.reset()
        assert await q.cancel_many("pending", "y") == 3
        # the LISTs and one GET of the pack; then GET, ended/ PUT, CAS of the pack per
        # task, and the pack's marker deleted with its last pending task
        assert q.storage.counts() == {"LIST": 2, "GET": 1 + 3, "PUT": 3, "PUT_COND": 3, "DELETE_BATCH": 1}
    finally:
        await q.close()


BAD_ARGS = [
    ("retry_many", dict(status="pending"), "status"),
    ("retry_many", dict(status="completed"), "status"),
    ("retry_many", dict(status=None), "status"),
    ("retry_many", dict(status=5), "status"),
    ("retry_many", dict(task_type="../x"), "task_type"),
    ("retry_many", dict(task_type=""), "task_type"),
    ("retry_many", dict(since="1h"), "since"),
    ("retry_many", dict(since=dt.timedelta(hours=-1)), "since"),
    ("retry_many", dict(since=dt.datetime(2030, 1, 1)), "since"),  # naive
    ("retry_many", dict(progress=5), "progress"),
    ("cancel_many", dict(status="completed"), "status"),
    ("cancel_many", dict(status="bogus"), "status"),
    ("cancel_many", dict(task_type="a/b"), "task_type"),
    ("cancel_many", dict(since=float("nan")), "since"),
    ("cancel_many", dict(progress="print"), "progress"),
]


async def test_bad_arguments_name_the_field_and_change_nothing(queue):
    await fail_some(queue, {"bad": 2})
    await queue.submit_many([("bad", 1), ("x", 2)])
    before = await all_objects(queue)
    for method, kwargs, field in BAD_ARGS:
        with pytest.raises(qo.InvalidInput) as err:
            await getattr(queue, method)(**kwargs)
        assert err.value.field == field, (method, kwargs)
    assert await all_objects(queue) == before


# -- the command line ---------------------------------------------------------------------


def test_cli_retry_all_failed_by_type_and_json(storage_url):
    async def setup():
        async with await qo.connect(storage_url) as q:
            return await fail_some(q, {"bad": 3, "other": 2}, ok=4)

    made = asyncio.run(setup())
    out = qo_cli("retry", "--all-failed", "--type", "bad", "--url", storage_url)
    assert (out.exit_code, out.stdout) == (0, "retried 3 tasks\n"), out.output
    out = qo_cli("retry", "--all-failed", "--since", "1h", "--json", "--url", storage_url)
    assert (out.exit_code, json.loads(out.stdout)) == (0, {"retried": 2}), out.output
    out = qo_cli("retry", "--all-failed", "--url", storage_url)
    assert (out.exit_code, out.stdout) == (0, "retried 0 tasks\n")

    async def check():
        async with await qo.connect(storage_url) as q:
            return await statuses(q, made["bad"] + made["other"]), await statuses(q, made["ok"])

    assert asyncio.run(check()) == (["pending"] * 5, ["completed"] * 4)


def test_cli_cancel_guard_progress_and_json(storage_url):
    async def setup():
        async with await qo.connect(storage_url) as q:
            return await q.submit_many([("t", i) for i in range(120)] + [("u", i) for i in range(3)])

    made = asyncio.run(setup())

    async def count(status: str) -> int:
        async with await qo.connect(storage_url) as q:
            return len(await ids(q, status))

    out = qo_cli("cancel", "--status", "pending", "--url", storage_url)  # every type: needs --yes
    assert out.exit_code == 2 and "--yes" in out.stderr and "--type" in out.stderr
    assert asyncio.run(count("pending")) == 123

    out = qo_cli("cancel", "--status", "pending", "--type", "t", "--url", storage_url)
    assert out.exit_code == 0, out.output
    assert out.stdout == "cancelled 120 tasks\n"
    assert re.search(r"^cancelled 100 of 1[0-2]\d listed\.\.\.$", out.stderr, re.M), out.stderr
    assert asyncio.run(count("pending")) == 3

    out = qo_cli("cancel", "--status", "pending", "--yes", "--json", "--url", storage_url)
    assert (out.exit_code, json.loads(out.stdout)) == (0, {"cancelled": 3}), out.output
    out = qo_cli("cancel", "--status", "blocked", "--yes", "--json", "--url", storage_url)
    assert (out.exit_code, json.loads(out.stdout)) == (0, {"cancelled": 0})
    assert asyncio.run(count("cancelled")) == len(made)

    out = qo_cli("retry", "--all-cancelled", "--type", "u", "--url", storage_url)
    assert (out.exit_code, out.stdout) == (0, "retried 3 tasks\n")
    assert asyncio.run(count("pending")) == 3


@pytest.mark.parametrize("args", [
    ["retry"],                                           # neither ID nor a bulk flag
    ["retry", "0" * 24, "--all-failed"],                 # both
    ["retry", "0" * 24, "--type", "t"],                  # a bulk filter with an ID
    ["retry", "--all-failed", "--all-cancelled"],
    ["cancel"],
    ["cancel", "0" * 24, "--status", "pending"],
    ["cancel", "0" * 24, "--since", "1h"],
    ["cancel", "--status", "blocked"],                   # every type without --yes
    ["cancel", "--status", "completed", "--type", "t"],  # not a status one cancels
])
def test_cli_usage_errors_exit_2_and_change_nothing(storage_url, args):
    async def setup():
        async with await qo.connect(storage_url) as q:
            await fail_some(q, {"t": 1})
            await q.submit("t", {})
            return await all_objects(q)

    async def after():
        async with await qo.connect(storage_url) as q:
            return await all_objects(q)

    before = asyncio.run(setup())
    out = qo_cli(*args, "--url", storage_url)
    assert out.exit_code == 2 and "Error" in out.stderr, out.output
    assert asyncio.run(after()) == before


@pytest.mark.parametrize("args, named", [
    (["retry", "--all-failed", "--since", "soon"], "--since"),
    (["cancel", "--status", "pending", "--type", "t", "--since", "-1h"], "--since"),
    (["retry", "--all-failed", "--type", "../x"], "task_type"),
    (["cancel", "--status", "pending", "--type", "a/b"], "task_type"),
])
def test_cli_bad_values_are_errors_naming_them(backend, storage_url, args, named):
    out = qo_cli(*args, "--url", storage_url)
    assert out.exit_code == 1 and named in out.stderr and "Traceback" not in out.output, out.output
    if backend == "local":  # checked before connecting: the store is not even created
        assert not os.path.exists(storage_url)


async def test_a_dead_letter_given_up_on_leaves_the_dead_letters(storage_url):
    """cancel() of a failed task: it ends cancelled, moves from ended/failed to
    ended/cancelled, and cancel_many("failed") does it to every dead letter."""
    import qo
    from qo import keys

    from conftest import FAST

    q = await qo.connect(storage_url, queue="q")
    try:
        tasks = await q.submit_many([("boom", {"i": i}, {"max_retries": 0}) for i in range(3)])
        w = qo.Worker(q, 2, **FAST)

        @w.handler("boom")
        async def boom(input, ctx):
            raise qo.Fail("no")

        await w.run(until_idle=True)
        assert [t.status async for t in q.list(status="failed")] == ["failed"] * 3
        one = await q.cancel(tasks[0].id)
        assert one.status == "cancelled"
        assert {t.id async for t in q.list(status="cancelled")} == {tasks[0].id}
        assert await q.cancel_many("failed", task_type="boom") == 2
        assert [t async for t in q.list(status="failed")] == []
        assert (await q.stats())["dead_letters"] == 0
        assert len(await q.storage.list(keys.ended_prefix(q.name, "cancelled"))) == 3
        with pytest.raises(qo.TaskStateError):
            await q.cancel(tasks[0].id)  # cancelled: nothing left to give up
        assert (await q.retry(tasks[1].id)).status == "pending"  # still retryable
    finally:
        await q.close()
