"""Cooperative cancel of a running task: ctx.cancel_requested (learned with the worker's
heartbeat, at no extra request while nothing is cancelled), ctx.raise_if_cancelled(),
and qo cancel ID --terminate (asyncio cancellation of an async handler)."""

from __future__ import annotations

import asyncio
import time

from click.testing import CliRunner

import qo
from qo.cli import build_cli
from qo.counting import CountingStorage

from conftest import FAST

# a canceller reads the record and CASes it back: a worker rewriting it every 0.1 s won
# every race against those two requests on a loaded machine (8 lost: the cancel unsaid)
BEAT = dict(FAST, heartbeat_interval=0.5)


async def _run_until(worker: qo.Worker, started: asyncio.Event, action) -> None:
    """Run the worker until idle; once the handler has started, do ``action``."""
    runner = asyncio.create_task(worker.run(until_idle=True))
    await asyncio.wait_for(started.wait(), 20)
    await action()
    await asyncio.wait_for(runner, 30)


async def test_a_handler_sees_the_cancel_and_the_task_ends_cancelled(storage_url):
    q = await qo.connect(storage_url, queue="q")
    other = await qo.connect(storage_url, queue="q")
    try:
        task = await q.submit("long", max_retries=5)
        started = asyncio.Event()
        seen = []
        w = qo.Worker(q, 1, **BEAT)

        @w.handler("long")
        async def long(input, ctx):
            started.set()
            for _ in range(400):
                if ctx.cancel_requested:
                    seen.append(True)
                ctx.raise_if_cancelled()
                await asyncio.sleep(0.02)
            return "finished anyway"

        async def cancel():
            t = await other.cancel(task.id)
            assert t.status == "running" and t.cancel_requested

        await _run_until(w, started, cancel)
        done = await q.get(task.id)
        assert done.status == "cancelled" and done.attempt == 1 and seen
        assert done.last_error["type"] == "Cancelled"
    finally:
        await q.close()
        await other.close()


async def test_terminate_cancels_an_async_handler(storage_url):
    q = await qo.connect(storage_url, queue="q")
    try:
        task = await q.submit("stuck", max_retries=5)
        started = asyncio.Event()
        interrupted = []
        w = qo.Worker(q, 1, **BEAT)

        @w.handler("stuck")
        async def stuck(input, ctx):
            started.set()
            try:
                await asyncio.sleep(60)  # never looks at ctx: terminate is what stops it
            except asyncio.CancelledError:
                interrupted.append(True)
                raise

        async def terminate():
            await q.cancel(task.id, terminate=True)

        t0 = time.monotonic()
        await _run_until(w, started, terminate)
        done = await q.get(task.id)
        assert done.status == "cancelled" and interrupted and done.attempt == 1
        assert time.monotonic() - t0 < 20
    finally:
        await q.close()


async def test_a_sync_handler_sees_the_flag_it_cannot_be_interrupted(storage_url):
    q = await qo.connect(storage_url, queue="q")
    try:
        task = await q.submit("blocking")
        started = asyncio.Event()
        loop = asyncio.get_running_loop()
        w = qo.Worker(q, 1, **BEAT)

        @w.handler("blocking")
        def blocking(input, ctx):
            loop.call_soon_threadsafe(started.set)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                ctx.raise_if_cancelled()
                time.sleep(0.02)
            return "ran to the end"

        async def terminate():
            await q.cancel(task.id, terminate=True)  # a thread cannot be cancelled: it sees the flag

        await _run_until(w, started, terminate)
        assert (await q.get(task.id)).status == "cancelled"
    finally:
        await q.close()


async def test_learning_of_cancels_costs_no_request_while_none_is_made(storage_url):
    q = await qo.connect(storage_url, queue="q", wrap_storage=CountingStorage)
    other = await qo.connect(storage_url, queue="q")
    try:
        task = await other.submit("slow")
        started = asyncio.Event()
        release = asyncio.Event()
        w = qo.Worker(q, 1, **dict(BEAT, sweep_interval=60))

        @w.handler("slow")
        async def slow(input, ctx):
            started.set()
            await release.wait()

        async def watch():
            await asyncio.sleep(0.3)  # past the start-up and a first heartbeat
            before = q.storage.counts()
            deadline = time.monotonic() + 30  # three heartbeats: 0.3 s, or seconds on a loaded machine
            while q.storage.counts().get("PUT_COND", 0) - before.get("PUT_COND", 0) < 3:
                assert time.monotonic() < deadline, "no three heartbeats"
                await asyncio.sleep(0.05)
            after = q.storage.counts()
            assert after.get("GET", 0) == before.get("GET", 0)  # and nothing read for cancels
            release.set()

        await _run_until(w, started, watch)
        assert (await other.get(task.id)).status == "completed"
    finally:
        await q.close()
        await other.close()


def test_cli_cancel_terminate(storage_url):
    runner = CliRunner()
    cli = build_cli()
    pending = runner.invoke(cli, ["submit", "t", "--url", storage_url]).stdout.strip()
    r = runner.invoke(cli, ["cancel", pending, "--terminate", "--url", storage_url])
    assert r.exit_code == 0 and r.stdout.strip() == "cancelled"  # not running: simply cancelled
    r = runner.invoke(cli, ["cancel", "--status", "pending", "--type", "t", "--terminate", "--url", storage_url])
    assert r.exit_code == 2 and "--terminate takes the ID" in r.stderr
