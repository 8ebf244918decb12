"""The qo_queue_* gauges: set from queue.stats() snapshots by the asyncio task the plugin
starts in qo_worker_started, on the local backend and on S3 (moto)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

import qo
from qo_metrics import METRICS
from qo_metrics.gauges import interval_from_env

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any credentials
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="module")
def moto():
    from qo.testing.moto import MotoServer

    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("moto").new_bucket()


def gauges(queue: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The qo_queue_* samples of ``queue`` in the exposition, by (name, other labels)."""
    out = {}
    for family in text_string_to_metric_families(METRICS.exposition()):
        for s in family.samples:
            if s.name.startswith("qo_queue_") and s.labels.get("queue") == queue:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "queue"))
                out[(s.name, labels)] = s.value
    return out


def test_the_gauges_show_the_queue_after_tasks_succeed_and_fail(url, monkeypatch):
    monkeypatch.setenv("QO_METRICS_STATS_INTERVAL", "0.1")
    name = f"m{uuid.uuid4().hex[:8]}"

    async def main() -> dict:
        queue = await qo.connect(url, queue=name)
        try:
            worker = qo.Worker(queue, concurrency=2, poll_min=0.01, poll_max=0.05, sweep_interval=0.2,
                               heartbeat_interval=0.1, shutdown_timeout=5.0)

            @worker.handler("ok")
            async def ok(value):
                return value

            @worker.handler("bad")
            async def bad(value):
                raise qo.Fail("no")

            for i in range(3):
                await queue.submit("ok", i)
            for i in range(2):
                await queue.submit("bad", i)
            for i in range(2):  # no handler here: they wait, high priority
                await queue.submit("other", i, priority="high")
            await queue.submit("other", None, schedule_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
            run = asyncio.create_task(worker.run())
            want = {("qo_queue_tasks", (("status", "pending"),)): 3.0,
                    ("qo_queue_tasks", (("status", "failed"),)): 2.0,
                    ("qo_queue_tasks", (("status", "running"),)): 0.0,
                    ("qo_queue_ready_tasks", (("band", "high"),)): 2.0,
                    ("qo_queue_ready_tasks", (("band", "normal"),)): 0.0,
                    ("qo_queue_dead_letters", ()): 2.0,
                    ("qo_queue_live_workers", ()): 1.0}
            deadline = time.monotonic() + 15
            seen: dict = {}
            while time.monotonic() < deadline:
                seen = gauges(name)
                if all(seen.get(k) == v for k, v in want.items()):
                    break
                await asyncio.sleep(0.1)
            assert METRICS.refresher.running  # refreshing while the worker runs
            worker.stop()
            await run
            assert id(worker) not in METRICS.refresher.running  # stopped with the worker
            return {"seen": seen, "want": want}
        finally:
            await queue.close()

    result = asyncio.run(main())
    seen = result["seen"]
    assert {k: seen.get(k) for k in result["want"]} == result["want"]
    assert seen[("qo_queue_oldest_due_age_seconds", ())] > 0  # the high-priority "other" tasks wait
    assert abs(seen[("qo_queue_stats_timestamp_seconds", ())] - time.time()) < 60


def test_the_refresh_interval_comes_from_the_environment():
    assert interval_from_env({}) == 30.0
    assert interval_from_env({"QO_METRICS_STATS_INTERVAL": "15"}) == 15.0
    assert interval_from_env({"QO_METRICS_STATS_INTERVAL": "off"}) == 0.0
    assert interval_from_env({"QO_METRICS_STATS_INTERVAL": "soon"}) == 30.0  # warned, default kept


def test_no_refresh_when_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("QO_METRICS_STATS_INTERVAL", "0")

    async def main() -> None:
        queue = await qo.connect(str(tmp_path / "s"), queue="off")
        worker = qo.Worker(queue, poll_min=0.01, poll_max=0.05)
        worker.handler("t")(lambda v: v)
        await queue.submit("t", 1)
        assert METRICS.refresher.start(worker) is None
        await worker.run(until_idle=True)
        await queue.close()

    asyncio.run(main())
    assert gauges("off") == {}


def test_no_stats_requests_while_nobody_reads_the_metrics(tmp_path, monkeypatch):
    """A worker of a process that serves no metrics (no --metrics-port) and sets no
    interval pays nothing for the gauges: no stats() snapshot, no request."""
    monkeypatch.delenv("QO_METRICS_STATS_INTERVAL", raising=False)
    monkeypatch.setattr(METRICS, "served", False)
    seen = []

    async def main() -> None:
        queue = await qo.connect(str(tmp_path / "s"), queue="quiet")
        worker = qo.Worker(queue, poll_min=0.01, poll_max=0.05)

        @worker.handler("t")
        async def t(v):
            seen.append(id(worker) in METRICS.refresher.running)  # other tests' workers may be there
            return v

        await queue.submit("t", 1)
        await worker.run(until_idle=True)
        await queue.close()

    asyncio.run(main())
    assert seen == [False] and gauges("quiet") == {}
