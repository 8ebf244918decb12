"""Shutdown and outages (issue 15): Ctrl-C never runs a task twice, a second signal
exits at once, and a drain whose storage keeps failing ends with a clear error."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import qo
from qo import keys
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5)

HANDLERS = textwrap.dedent('''
    import os, time
    import qo

    @qo.handler("slow")
    def slow(input):                     # a sync handler: a thread nobody can interrupt
        with open(os.environ["RAN_LOG"], "a") as f:
            f.write("start\\n")
        time.sleep(input)
        with open(os.environ["RAN_LOG"], "a") as f:
            f.write("end\\n")
        return "done"
''')


def start_worker(tmp_path, url: str, *flags: str) -> tuple[subprocess.Popen, str]:
    (tmp_path / "handlers.py").write_text(HANDLERS)
    ran = str(tmp_path / "ran.log")
    env = {**os.environ, "RAN_LOG": ran}
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "qo"), "worker", str(tmp_path / "handlers.py"), "--url", url,
                             "--queue", "q", "--concurrency", "2", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ran


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def lines(path: str) -> list[str]:
    return open(path).read().split() if os.path.exists(path) else []


async def test_a_sync_handler_still_running_at_the_shutdown_timeout_finishes_and_is_not_run_twice(storage_url, tmp_path):
    q = await qo.connect(storage_url, queue="q")
    task = await q.submit("slow", 1.5)
    proc, ran = start_worker(tmp_path, storage_url, "--shutdown-timeout", "0.2")
    try:
        await asyncio.to_thread(wait_for, lambda: lines(ran) == ["start"])
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert lines(ran) == ["start", "end"]  # it ran to its end, once
    done = await q.get(task.id)
    assert done.status == "completed" and done.output == "done" and done.attempt == 1
    assert "waiting up to 0.2 s for 1 running task" in err and "a sync handler cannot be interrupted" in err
    assert await q.storage.list(keys.workers_prefix("q")) == []
    await q.close()


async def test_a_second_signal_exits_at_once_and_leaves_the_task_to_recovery(storage_url, tmp_path):
    q = await qo.connect(storage_url, queue="q")
    task = await q.submit("slow", 60)
    proc, ran = start_worker(tmp_path, storage_url, "--shutdown-timeout", "0.2", "--lease-ttl", "1")
    try:
        await asyncio.to_thread(wait_for, lambda: lines(ran) == ["start"])
        proc.send_signal(signal.SIGINT)
        await asyncio.sleep(0.5)
        assert proc.poll() is None  # still waiting for the sync handler
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "second SIGINT: exiting now" in err and task.id in err
    running = await q.get(task.id)
    assert running.status == "running"
    [record] = await q.storage.list(keys.workers_prefix("q"))
    assert task.id in (await q.storage.get(record.key)).data.decode()  # named: recovery finds it
    w = Worker(q, concurrency=1, **FAST)
    w.handler("slow")(lambda input: "second run")
    await asyncio.sleep(1.2)  # the record's 1 s lease passes
    await asyncio.wait_for(w.run(until_idle=True), 30)
    done = await q.get(task.id)
    assert done.status == "completed" and done.output == "second run" and w.stats["recovered"] == 1
    await q.close()


class DeletesRefused:
    """Every delete is refused, as Azurite 3.35's blob batch refuses every sub-request."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.delete_many = self._refuse_many

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def delete(self, key, if_match=None):
        raise qo.StorageError("400 InvalidInput", backend=self.name, key=key)

    async def _refuse_many(self, keys):
        raise qo.StorageError("400 InvalidInput (every sub-request)", backend=self.name)


async def test_a_drain_whose_storage_keeps_failing_ends_with_a_clear_error(storage_url, caplog):
    caplog.set_level(logging.WARNING, logger="qo.worker")
    q = await qo.connect(storage_url, queue="q", wrap_storage=DeletesRefused)
    tasks = [await q.submit("t", i) for i in range(3)]
    w = Worker(q, concurrency=2, storage_failure_limit=1.5, **FAST)
    w.handler("t")(lambda input: input)
    with pytest.raises(qo.StorageError, match="storage kept failing for .* s while deleting claimed markers"):
        await asyncio.wait_for(w.run(until_idle=True), 30)
    assert [(await q.get(t.id)).status for t in tasks] == ["completed"] * 3
    said = [r for r in caplog.records if "deleting claimed markers failed" in r.getMessage()]
    assert 1 <= len(said) <= 5  # once per backoff step, not once per attempt (every ~10 ms)
    await q.close()


def test_qo_worker_until_idle_exits_non_zero_when_storage_keeps_failing(tmp_path):
    """The CLI: the same outage ends `qo worker --until-idle` with exit 1 and one line."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f'''
        import asyncio, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import qo
        from qo.cli import cli
        from test_shutdown import DeletesRefused
        import qo.queue
        orig = qo.queue.connect
        async def connect(*a, **kw):
            return await orig(*a, **{{**kw, "wrap_storage": DeletesRefused}})
        qo.queue.connect = connect  # what qo.cli's open_queue calls
        async def submit():
            q = await orig({str(tmp_path / "s")!r}, queue="q")
            await q.submit("slow", 0)
            await q.close()
        asyncio.run(submit())
        import os
        os.environ["QO_STORAGE_FAILURE_LIMIT"] = "1"
        cli(["worker", {str(tmp_path / "handlers.py")!r}, "--url", {str(tmp_path / "s")!r}, "--queue", "q",
             "--until-idle"])
    '''))
    (tmp_path / "handlers.py").write_text(HANDLERS)
    env = {**os.environ, "RAN_LOG": str(tmp_path / "ran.log")}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "error: storage kept failing" in done.stderr and "Traceback" not in done.stderr
