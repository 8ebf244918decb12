"""The task lifecycle on both backends: submit, claim, complete, retry, dead letter, cancel."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest

import qo
from qo import keys
from qo.model import MAX_PAYLOAD_BYTES
from qo.worker import Worker


async def all_keys(queue) -> list[str]:
    return [e.key for e in await queue.storage.list(f"{queue.name}/")]


async def ready_keys(queue) -> list[str]:
    return [e.key for e in await queue.storage.list(keys.ready_prefix(queue.name))]


async def test_submit_then_worker_completes_with_output(queue, fast_settings, events):
    task = await queue.submit("add", {"a": 2, "b": 3}, priority=200, max_retries=1)
    assert task.status == "pending" and task.priority == 200 and task.attempt == 0
    stored = await queue.get(task.id)
    assert stored.status == "pending" and stored.input == {"a": 2, "b": 3}
    assert await ready_keys(queue) == [keys.ready(queue.name, 200, task.available_at, task.id, "add")]

    worker = Worker(queue, settings=fast_settings)

    @worker.handler("add")
    async def add(input, ctx):
        assert ctx.task.id == task.id and ctx.attempt == 1
        return {"sum": input["a"] + input["b"]}

    stats = await worker.run(until_idle=True)
    done = await queue.get(task.id)
    assert done.status == "completed"
    assert done.output == {"sum": 5}
    assert done.attempt == 1 and done.finished_at is not None and done.lease_id is None
    assert stats["completed"] == 1
    assert events.of(task.id) == ["submitted", "started", "succeeded"]
    # markers and the worker's record are gone; only the task remains
    assert await all_keys(queue) == [keys.task(queue.name, task.id)]


async def test_sync_handler_runs_in_a_thread(queue, fast_settings):
    import threading

    task = await queue.submit("sync", {"x": 1})
    worker = Worker(queue, settings=fast_settings)
    seen = {}

    @worker.handler("sync")
    def sync_handler(input):
        seen["thread"] = threading.current_thread().name
        return input["x"] + 1

    await worker.run(until_idle=True)
    assert (await queue.get(task.id)).output == 2
    assert seen["thread"].startswith("qo-handler")


async def test_failing_task_retries_then_dead_letters(queue, fast_settings, events):
    task = await queue.submit("boom", None, max_retries=2)
    worker = Worker(queue, settings=fast_settings)
    calls = []

    @worker.handler("boom")
    async def boom(input, ctx):
        calls.append(ctx.attempt)
        raise qo.Retry(delay=0) if ctx.attempt < 3 else ValueError("still broken")

    await worker.run(until_idle=True)
    dead = await queue.get(task.id)
    assert calls == [1, 2, 3]  # max_retries=2: three attempts in all
    assert dead.status == "failed" and dead.attempt == 3
    assert dead.last_error["type"] == "ValueError" and "still broken" in dead.last_error["message"]
    assert "Traceback" in dead.last_error["traceback"]
    assert events.of(task.id) == ["submitted", "started", "retried", "started", "retried", "started", "failed"]
    assert [t.id async for t in queue.list(status="failed")] == [task.id]


async def test_fail_dead_letters_without_retry_and_retry_revives(queue, fast_settings):
    task = await queue.submit("bad", {"to": "nobody"}, max_retries=5)
    worker = Worker(queue, settings=fast_settings)
    attempts = []

    @worker.handler("bad")
    async def bad(input, ctx):
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            raise qo.Fail("bad address")
        return "ok"

    await worker.run(until_idle=True)
    failed = await queue.get(task.id)
    assert failed.status == "failed" and failed.attempt == 1 and failed.last_error["message"] == "bad address"

    revived = await queue.retry(task.id)
    assert revived.status == "pending" and revived.attempt == 0
    await worker.run(until_idle=True)
    assert (await queue.get(task.id)).status == "completed"
    assert attempts == [1, 1]


async def test_retry_backoff_delays_the_next_attempt(queue, fast_settings):
    task = await queue.submit("flaky", None, max_retries=3)
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("flaky")
    async def flaky(input, ctx):
        raise qo.Retry(delay=3600)

    run = asyncio.create_task(worker.run(until_idle=True))
    while (waiting := await queue.get(task.id)).attempt == 0 or waiting.status != "pending":
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert not run.done()  # a delayed task of a handled type keeps until_idle waiting
    worker.stop()
    await run
    waiting = await queue.get(task.id)
    assert waiting.status == "pending" and waiting.attempt == 1
    assert waiting.available_at >= waiting.updated_at + 3599
    delayed = [e.key for e in await queue.storage.list(keys.delayed_prefix(queue.name))]
    assert delayed == [keys.delayed(queue.name, 128, waiting.available_at, task.id, "flaky")]
    assert await ready_keys(queue) == []


async def test_handler_timeout_fails_the_attempt(queue, fast_settings):
    task = await queue.submit("slow", None, max_retries=0, timeout_seconds=0.2)
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("slow")
    async def slow(input, ctx):
        await asyncio.Event().wait()

    await worker.run(until_idle=True)
    t = await queue.get(task.id)
    assert t.status == "failed" and t.last_error["type"] == "TimeoutError"


async def test_non_json_output_is_a_failure_not_a_crash(queue, fast_settings):
    task = await queue.submit("weird", None, max_retries=3)
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("weird")
    async def weird(input, ctx):
        return {"nan": float("nan")}

    await worker.run(until_idle=True)
    t = await queue.get(task.id)
    assert t.status == "failed" and t.attempt == 1 and "output" in t.last_error["message"]


async def test_cancel_pending_task_never_runs(queue, fast_settings, events):
    keep = await queue.submit("job", 1)
    drop = await queue.submit("job", 2)
    later = await queue.submit("job", 3, schedule_at=datetime.now(timezone.utc) + timedelta(hours=1))
    assert (await queue.cancel(drop.id)).status == "cancelled"
    assert (await queue.cancel(later.id)).status == "cancelled"
    ran = []
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("job")
    async def job(input, ctx):
        ran.append(input)

    await worker.run(until_idle=True)
    assert ran == [1]
    assert (await queue.get(drop.id)).status == "cancelled"
    assert events.of(drop.id) == ["submitted", "cancelled"]
    assert await queue.storage.list(keys.delayed_prefix(queue.name)) == []
    with pytest.raises(qo.TaskStateError):
        await queue.cancel(keep.id)  # completed: too late


async def test_cancel_running_task_stops_its_retries(queue, fast_settings):
    task = await queue.submit("long", None, max_retries=5)
    started, release = asyncio.Event(), asyncio.Event()
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("long")
    async def long(input, ctx):
        started.set()
        await release.wait()
        raise RuntimeError("interrupted")

    run = asyncio.create_task(worker.run(until_idle=True))
    await asyncio.wait_for(started.wait(), 10)
    marked = await queue.cancel(task.id)
    assert marked.status == "running" and marked.cancel_requested
    release.set()
    await asyncio.wait_for(run, 10)
    t = await queue.get(task.id)
    assert t.status == "cancelled" and t.attempt == 1


async def test_schedule_at_is_invisible_until_due(queue, fast_settings):
    await queue.settings.get()  # the first request (connection, settings read) before the clock starts
    worker = Worker(queue, settings=fast_settings)
    started_at = []

    @worker.handler("at")
    async def at(input, ctx):
        started_at.append(queue.clock.now())

    # the worker is up before the task is submitted: its start on a loaded machine (limits,
    # settings, its first record and sweep: seconds on a loaded moto) is not the lateness measured
    run = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 60
    while worker.book.etag is None:
        assert time.monotonic() < deadline and not run.done(), "the worker did not start"
        await asyncio.sleep(0.02)
    soon = datetime.now(timezone.utc) + timedelta(seconds=2.5)  # later than a slow submit on a busy machine
    task = await queue.submit("at", None, schedule_at=soon)
    assert task.available_at == pytest.approx(soon.timestamp(), abs=0.01)
    assert await ready_keys(queue) == []
    deadline = time.monotonic() + 60
    while not started_at:
        assert time.monotonic() < deadline, "the task never started"
        await asyncio.sleep(0.02)
    worker.stop()
    await run
    assert len(started_at) == 1
    assert started_at[0] >= soon.timestamp()
    # within a few polls (poll_max 0.05 s): a promotion, a LIST and a claim, each up to ~1 s
    # on a loaded machine, against a worker that would wait for a sweep or a long poll
    assert started_at[0] - soon.timestamp() < 3.0


async def test_wait_returns_the_terminal_task(queue, fast_settings):
    task = await queue.submit("w", 5)
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("w")
    def w(input):
        return input * 2

    run = asyncio.create_task(worker.run(until_idle=True))
    done = await queue.wait(task.id, timeout=10)
    await run
    assert done.status == "completed" and done.output == 10
    with pytest.raises(qo.TaskNotFound):
        await queue.get("0" * 24)


async def test_submit_many_validates_all_before_writing(queue):
    with pytest.raises(qo.InvalidInput) as err:
        await queue.submit_many([("ok", 1), ("ok", 2), ("ok", 3, {"priority": 300})])
    assert err.value.field == "items[2].priority"
    assert await all_keys(queue) == []
    progress = []
    tasks = await queue.submit_many([("ok", i, {"priority": i}) for i in range(20)],
                                    progress=lambda done, total: progress.append((done, total)))
    assert [t.priority for t in tasks] == list(range(20))
    assert progress[-1] == (20, 20) and len(progress) == 20
    assert len(await ready_keys(queue)) == 20


async def test_list_filters_by_status_and_type(queue, fast_settings):
    a = await queue.submit("a", None)
    b = await queue.submit("b", None)
    await queue.cancel(b.id)
    assert [t.id async for t in queue.list()] == [a.id, b.id]
    assert [t.id async for t in queue.list(status="cancelled")] == [b.id]
    assert [t.id async for t in queue.list(task_type="a")] == [a.id]
    assert [t.id async for t in queue.list(limit=1)] == [a.id]
    with pytest.raises(qo.InvalidInput):
        [t async for t in queue.list(status="nope")]


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda q: q.submit("a/b", None), "task_type"),
        (lambda q: q.submit("../x", None), "task_type"),
        (lambda q: q.submit("x" * 200, None), "task_type"),
        (lambda q: q.submit("ok", {"x": object()}), "input"),
        (lambda q: q.submit("ok", float("nan")), "input"),
        (lambda q: q.submit("ok", "x" * MAX_PAYLOAD_BYTES), "input"),  # over the cap by its quotes
        (lambda q: q.submit("ok", None, priority=300), "priority"),
        (lambda q: q.submit("ok", None, priority=-1), "priority"),
        (lambda q: q.submit("ok", None, priority="urgent"), "priority"),
        (lambda q: q.submit("ok", None, priority=True), "priority"),
        (lambda q: q.submit("ok", None, schedule_at=datetime(2030, 1, 1)), "schedule_at"),
        (lambda q: q.submit("ok", None, timeout_seconds=-5), "timeout_seconds"),
        (lambda q: q.submit("ok", None, max_retries=-1), "max_retries"),
        (lambda q: q.get("../../etc/passwd"), "task_id"),
    ],
)
async def test_bad_input_is_named_and_nothing_is_written(queue, call, field):
    with pytest.raises(qo.InvalidInput) as err:
        await call(queue)
    assert err.value.field == field
    assert field in str(err.value)
    assert await all_keys(queue) == []


async def test_priority_names_are_accepted(queue):
    assert (await queue.submit("p", None, priority="high")).priority == 192
    assert (await queue.submit("p", None, priority="background")).priority == 0


@pytest.mark.parametrize("url", ["", "gs://bucket", "s3//nope", "::://x", "file://remotehost/x"])
async def test_malformed_or_unknown_urls_are_clear_errors(url):
    with pytest.raises(qo.QoError) as err:
        await qo.connect(url)
    assert "url" in str(err.value)


async def test_bad_queue_name_is_rejected():
    with pytest.raises(qo.InvalidInput) as err:
        await qo.connect("/tmp/qo-never-created", queue="../etc")
    assert err.value.field == "queue"
