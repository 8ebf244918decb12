"""qo.connect_sync / qo.SyncQueue and @qo.task: the blocking API for web apps and scripts."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import textwrap
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import qo
from qo.counting import CountingStorage
from qo.handlers import default_registry

from conftest import FAST


def _type() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def task_types():
    """Task types registered by @qo.task in a test are unregistered after it."""
    made: list[str] = []
    yield made
    for name in made:
        default_registry.handlers.pop(name, None)


def test_sync_queue_does_what_the_async_one_does(storage_url):
    with qo.connect_sync(storage_url, queue="q") as q:
        assert isinstance(q, qo.SyncQueue) and q.name == "q"
        a = q.submit("a", {"n": 1}, priority="high")
        b = q.submit("b", {"n": 2}, schedule_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
        assert q.get(a.id).priority == 192 and q.get(b.id).status == "pending"
        many = q.submit_many([("a", {"n": i}) for i in range(3)])
        graph = q.submit_graph({"x": {"task_type": "a"}, "y": {"task_type": "a", "depends_on": ["x"]}})
        assert q.get(graph["y"].id).status == "blocked"
        listed = q.list(status="pending", task_type="a")
        assert isinstance(listed, list)
        assert {t.id for t in listed} == {a.id, *(t.id for t in many), graph["x"].id}
        it = q.iterate(status="pending", task_type="a")
        assert not isinstance(it, list)
        assert sorted(t.id for t in it) == sorted(t.id for t in listed)
        stats = q.stats()
        assert stats["counts"]["pending"] == 6 and stats["counts"]["blocked"] == 1
        assert q.cancel(a.id).status == "cancelled"
        assert q.retry(a.id).status == "pending"
        assert q.cancel_many("pending", task_type="a") == 5
        assert q.retry_many("cancelled", task_type="a") == 5

        q.schedules.add("nightly", cron="0 3 * * *", task_type="a")
        assert [s.name for s in q.schedules.list()] == ["nightly"]
        assert q.schedules.pause("nightly").enabled is False
        q.limits.set("task_type:a", 5, per=1.0)
        assert [d.scope for d in q.limits.definitions()] == ["task_type:a"]
        q.settings.set(max_retries=7)
        assert q.settings.get()["max_retries"] == 7
        assert q.submit("c").max_retries == 7
        assert q.purge("cancelled", older_than=3600) == 0


def test_sync_errors_are_the_async_errors(storage_url):
    with qo.connect_sync(storage_url, queue="q") as q:
        with pytest.raises(qo.TaskNotFound):
            q.get("01a2296c1219000053e3ee6a")
        with pytest.raises(qo.InvalidInput) as e:
            q.submit("a", priority=999)
        assert e.value.field == "priority"
        with pytest.raises(qo.InvalidInput) as e:
            q.iterate(status="bogus")  # checked at the call, before anything is read
        assert e.value.field == "status"
        with pytest.raises(TimeoutError):
            q.wait(q.submit("a").id, timeout=0.05)


def test_many_threads_share_one_sync_queue(storage_url):
    with qo.connect_sync(storage_url, queue="q") as q:
        def produce(i: int) -> list[str]:
            return [q.submit("a", {"thread": i, "n": n}).id for n in range(6)]

        with ThreadPoolExecutor(8) as pool:
            ids = [i for batch in pool.map(produce, range(8)) for i in batch]
        assert len(set(ids)) == 48
        assert {t.id for t in q.list(status="pending", limit=None)} == set(ids)
        assert {q.get(i).input["thread"] for i in ids} == set(range(8))


def test_sync_calls_cost_the_requests_of_async_calls(storage_url):
    async def async_run():
        q = await qo.connect(storage_url, queue="a", wrap_storage=CountingStorage)
        t = await q.submit("a", {"x": 1})
        await q.get(t.id)
        _ = [x async for x in q.list(status="pending")]
        counts = q.storage.counts()
        await q.close()
        return counts

    expected = asyncio.run(async_run())
    with qo.connect_sync(storage_url, queue="s", wrap_storage=CountingStorage) as q:
        t = q.submit("a", {"x": 1})
        q.get(t.id)
        q.list(status="pending")
        assert q.storage.counts() == expected


def test_sync_queue_refuses_a_running_event_loop(storage_url):
    q = qo.connect_sync(storage_url, queue="q")
    try:
        async def inside():
            with pytest.raises(RuntimeError, match=r"await queue\.submit"):
                q.submit("a")
            with pytest.raises(RuntimeError, match="async API"):
                qo.connect_sync(storage_url)

        asyncio.run(inside())
        assert q.submit("a").status == "pending"  # outside the loop it works
    finally:
        q.close()


def test_close_stops_the_loop_thread_and_later_calls_fail(storage_url):
    before = set(threading.enumerate())  # the threads themselves: an ended thread's ident is reused
    q = qo.connect_sync(storage_url, queue="q")
    new = [t for t in threading.enumerate() if t not in before and t.name == "qo-sync-loop"]
    assert new == [q._runner._thread] and new[0].is_alive()
    q.close()
    q.close()  # idempotent
    assert q.closed and not new[0].is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        q.submit("a")


def test_a_script_that_never_closes_exits_cleanly(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import qo
        q = qo.connect_sync({str(tmp_path / 'store')!r}, queue="q")
        print(q.submit("a", {{"x": 1}}).status)
    """))
    done = subprocess.run([sys.executable, "-W", "error::ResourceWarning", str(script)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pending"
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


# -- @qo.task ---------------------------------------------------------------------------


def test_task_function_registers_and_submits_with_its_defaults(storage_url, task_types):
    name = _type()
    task_types.append(name)

    @qo.task(name, queue="emails", url=storage_url, priority="high", max_retries=5)
    def send(input):
        return {"sent": input["to"]}

    assert isinstance(send, qo.TaskFunction) and send.__name__ == "send"
    assert default_registry.handlers[name].fn is send.fn
    assert send({"to": "x"}) == {"sent": "x"}  # a plain call just runs it

    t = send.submit_sync({"to": "a@example.com"})
    assert (t.task_type, t.priority, t.max_retries) == (name, 192, 5)
    t2 = send.submit_sync({"to": "b"}, priority=3)
    assert (t2.priority, t2.max_retries) == (3, 5)
    t5 = send.delay({"to": "e"}, priority=4)  # Celery's name for it
    assert (t5.task_type, t5.priority, t5.max_retries, t5.input) == (name, 4, 5, {"to": "e"})

    async def from_async():
        t3 = await send.submit({"to": "c"}, max_retries=1)
        q = await qo.connect(storage_url, queue="emails")
        try:
            t4 = await send.submit({"to": "d"}, using=q)
            return t3, t4, await q.get(t3.id)
        finally:
            await q.close()

    t3, t4, stored = asyncio.run(from_async())
    assert (t3.priority, t3.max_retries) == (192, 1) and stored.id == t3.id
    assert t4.priority == 192

    async def run_worker():
        q = await qo.connect(storage_url, queue="emails")
        w = qo.Worker(q, **FAST)
        w.add_handlers(qo.handlers.import_handlers([]))
        await w.run(until_idle=True)
        done = [await q.get(x.id) for x in (t, t2, t3, t4, t5)]
        await q.close()
        return done

    done = asyncio.run(run_worker())
    assert [d.status for d in done] == ["completed"] * 5
    assert done[0].output == {"sent": "a@example.com"}


def test_task_function_bad_options_name_the_field(task_types):
    with pytest.raises(qo.InvalidInput) as e:
        qo.task("x", retries=3)
    assert e.value.field == "retries"
    with pytest.raises(qo.InvalidInput) as e:
        qo.task("x", queue="bad name")
    assert e.value.field == "queue"
    name = _type()
    task_types.append(name)

    @qo.task(name)
    async def fn(input, ctx):
        return 1

    with pytest.raises(qo.InvalidInput) as e:
        fn.submit_sync(None, prio=1)
    assert e.value.field == "input" and "prio" in str(e.value)
    for submit in (fn.submit_sync, fn.delay):  # Celery's habit: the input as keywords
        with pytest.raises(qo.InvalidInput) as e:
            submit(a=1, b=2)
        assert e.value.field == "input" and "{'a': ..., 'b': ...}" in str(e.value)
    assert name not in [t for t in ()]  # nothing was submitted: the names are checked first


def test_bare_task_decorator_uses_the_function_name(task_types):
    @qo.task
    def bare_task_fn_for_test(input):
        return input

    task_types.append("bare_task_fn_for_test")
    assert bare_task_fn_for_test.task_type == "bare_task_fn_for_test"
    assert "bare_task_fn_for_test" in default_registry.handlers
