"""A worker started while the store does not answer waits for it (qo/outage.py,
``wait_until_reachable``): capped backoff on the queue's clock, one line per wait, work
once the store answers; ``startup_timeout`` bounds the wait; other errors end it at once."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import qo
from clocks import ticking_queue
from qo import keys
from qo.errors import StorageError, StorageUnavailable
from qo.testing.faults import FaultyStorage
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.2, sweep_interval=1.0, buffer_max_age=0.5, shutdown_timeout=5.0)
UNREACHABLE = re.compile(r"store unreachable \((.+)\); retrying in (\d+\.\d) s$")


def waits(caplog) -> list[float]:
    """The waits the worker announced, in order ("store unreachable (...); retrying in N s")."""
    out = []
    for r in caplog.records:
        m = UNREACHABLE.search(r.getMessage()) if r.name == "qo.worker" else None
        if m:
            assert r.levelname == "WARNING"
            out.append(float(m.group(2)))
    return out


async def until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def test_a_worker_started_during_an_outage_waits_and_starts_work_when_the_store_answers(storage_url, caplog):
    """Every request fails (the fault injector, before reaching the backend) while the
    worker starts: it waits 1 s, 2 s, 4 s ... on the queue's clock (here 20x real time),
    one line per wait and one request per try; once the store answers it runs the task."""
    caplog.set_level(logging.INFO, logger="qo.worker")
    faults: list[FaultyStorage] = []

    def faulty(storage):
        faults.append(FaultyStorage(storage, error_rate=1.0))
        return faults[-1]

    async with ticking_queue(storage_url, "startup", speed=20.0) as (producer, clock):
        task = await producer.submit("t", 21)
        q = await qo.connect(storage_url, queue="startup", clock=clock, wrap_storage=faulty)
        try:
            worker = Worker(q, concurrency=1, **FAST)

            @worker.handler("t")
            async def double(x):
                return 2 * x

            running = asyncio.create_task(worker.run(until_idle=True))
            await until(lambda: len(waits(caplog)) >= 3 or running.done())
            assert not running.done()  # an outage at start-up is waited out, not an exit
            failed_tries = faults[0].injected()["error"]
            faults[0].enabled = False  # the store answers again
            done = await producer.wait(task.id, timeout=30)
            stats = await asyncio.wait_for(running, 30)
        finally:
            await q.close()
    assert done.status == "completed" and done.output == 42 and stats["completed"] == 1
    announced = waits(caplog)
    # once per step: one line per failed try, and each try was one request (no retries hidden in it)
    assert len(announced) == failed_tries >= 3
    assert faults[0].injected() == {**faults[0].injected(), "error:list": failed_tries}
    for n, wait in enumerate(announced):  # 1 s doubling, jittered 0.8x-1x, capped at 30 s
        assert 0.8 * min(30.0, 2.0 ** n) - 0.05 <= wait <= min(30.0, 2.0 ** n) + 0.05
    said = [r.getMessage() for r in caplog.records if r.name == "qo.worker" and r.levelno >= logging.WARNING]
    assert said[:len(announced)] == [m for m in said if UNREACHABLE.search(m)]  # nothing else said meanwhile
    assert sum("store reachable after" in m for m in said) == 1


async def test_startup_timeout_bounds_the_wait(storage_url, caplog):
    caplog.set_level(logging.INFO, logger="qo.worker")
    async with ticking_queue(storage_url, "bounded", speed=20.0) as (q0, clock):
        q = await qo.connect(storage_url, queue="bounded", clock=clock,
                             wrap_storage=lambda s: FaultyStorage(s, error_rate=1.0))
        try:
            worker = Worker(q, concurrency=1, startup_timeout=5.0, **FAST)
            worker.handler("t")(lambda x: x)
            started = clock.now()
            with pytest.raises(StorageUnavailable, match=r"did not answer within the start-up timeout \(5 s\)"):
                await asyncio.wait_for(worker.run(), 30)
            assert 5.0 <= clock.now() - started < 8.0  # on the queue's clock: 1 + 2 + the 2 left
        finally:
            await q.close()
        assert await q0.storage.list(keys.workers_prefix("bounded")) == []  # nothing was written
    assert len(waits(caplog)) == 3


class Refusing:
    """A backend that answers, and refuses: the credentials lack permission."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def list(self, *args, **kwargs):
        raise StorageError("access denied: the credentials lack permission [AccessDenied, HTTP 403]",
                           backend=self.inner.name)


async def test_a_store_that_refuses_ends_the_start_at_once(storage_url, caplog):
    """Not an outage (bad credentials, a refused store): no wait, the error at once."""
    caplog.set_level(logging.INFO, logger="qo.worker")
    async with ticking_queue(storage_url, "refused", speed=1.0) as (_, clock):
        q = await qo.connect(storage_url, queue="refused", clock=clock, wrap_storage=Refusing)
        try:
            worker = Worker(q, concurrency=1, **FAST)
            worker.handler("t")(lambda x: x)
            started = clock.now()
            with pytest.raises(StorageError, match="access denied") as raised:
                await asyncio.wait_for(worker.run(), 30)
            assert not isinstance(raised.value, StorageUnavailable)
            assert clock.now() - started < 1.0
        finally:
            await q.close()
    assert waits(caplog) == []


async def test_a_worker_stopped_while_it_waits_for_the_store_exits_cleanly(storage_url):
    async with ticking_queue(storage_url, "stopped", speed=20.0) as (_, clock):
        q = await qo.connect(storage_url, queue="stopped", clock=clock,
                             wrap_storage=lambda s: FaultyStorage(s, error_rate=1.0))
        try:
            worker = Worker(q, concurrency=1, **FAST)
            worker.handler("t")(lambda x: x)
            running = asyncio.create_task(worker.run())
            await asyncio.sleep(0.1)
            worker.stop()  # as SIGTERM does
            stats = await asyncio.wait_for(running, 10)
            assert sum(stats.values()) == 0
        finally:
            await q.close()


def test_startup_timeout_with_a_dead_endpoint_exits_1_with_one_line(tmp_path):
    """`qo worker --startup-timeout 2` against a port with nothing listening."""
    port = free_port()
    (tmp_path / "handlers.py").write_text("import qo\n\n@qo.handler('t')\ndef t(x):\n    return x\n")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from qo.cli import main; main()", "worker", "handlers.py", "--startup-timeout", "2",
         "--url", f"s3://dead-bucket/p?endpoint_url=http://127.0.0.1:{port}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in done.stderr
    assert "did not answer within the start-up timeout (2 s)" in errors[0]
    assert f"127.0.0.1:{port}" in errors[0]
    assert 1 <= sum("store unreachable" in line for line in lines) <= 3
    assert took < 60  # about 2 s, plus the interpreter's start: a generous bound


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


async def test_a_worker_process_started_before_its_s3_server_runs_the_task_once_it_is_up(tmp_path, moto_server):
    """The real thing on S3: `qo worker` against an endpoint where nothing listens yet
    says it waits; a moto server started later on that port gets a task; it runs."""
    from urllib.parse import quote, urlsplit

    from qo.testing.moto import MotoServer

    port = free_port()
    # the bucket exists before the late server listens (moto's state is per process): a
    # worker that met the server before its bucket would rightly exit (no such bucket)
    bucket = urlsplit(moto_server.new_bucket()).netloc
    url = f"s3://{bucket}/p?endpoint_url={quote(f'http://127.0.0.1:{port}', safe='')}&region=us-east-1"
    (tmp_path / "handlers.py").write_text("import qo\n\n@qo.handler('t')\ndef t(x):\n    return x * 2\n")
    proc = subprocess.Popen([sys.executable, "-c", "from qo.cli import main; main()", "worker", "handlers.py",
                             "--url", url, "--poll-max", "0.2"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    server = MotoServer(bucket=bucket, port=port)
    try:
        deadline = time.monotonic() + 60
        while not any("store unreachable" in line for line in lines):
            assert proc.poll() is None, "".join(lines)  # it waits, it does not exit
            assert time.monotonic() < deadline, "".join(lines)
            await asyncio.sleep(0.05)
        server.start()  # the store comes up
        q = await qo.connect(url, queue="default")
        try:
            task = await q.submit("t", 21)
            deadline = time.monotonic() + 60
            while (done := await q.get(task.id)).status != "completed":
                assert proc.poll() is None, "".join(lines)
                assert time.monotonic() < deadline, "".join(lines)
                await asyncio.sleep(0.05)
        finally:
            await q.close()
        assert done.status == "completed" and done.output == 42
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        server.stop()
    said = "".join(lines)
    assert "cannot reach the S3 endpoint" in said and said.count("store reachable after") == 1
    assert "error:" not in said and "Traceback" not in said
