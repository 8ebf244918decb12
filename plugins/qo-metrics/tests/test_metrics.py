"""qo-metrics, self-contained: the local backend in a tmp_path, the plugin found through
its entry point (installed), a real ``qo worker --metrics-port`` scraped over HTTP."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import qo
from qo_metrics import METRICS, Metrics


def qo_command() -> list[str]:
    exe = Path(sys.executable).with_name("qo")
    return [str(exe)] if exe.exists() else [shutil.which("qo") or "qo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(registry_samples: dict, name: str, **labels: str) -> float | None:
    return registry_samples.get((name, tuple(sorted(labels.items()))))


def fast_worker(queue: qo.Queue) -> qo.Worker:
    return qo.Worker(queue, concurrency=4, poll_min=0.01, poll_max=0.05, sweep_interval=0.2,
                     buffer_max_age=0.5, shutdown_timeout=5.0)


def test_the_plugin_is_loaded_through_its_entry_point():
    from qo.plugins import get_plugins

    info = get_plugins().info["metrics"]
    assert info.status == "loaded" and info.distribution == "qo-metrics"
    assert info.hooks == ["qo_cli_commands", "qo_task_event", "qo_worker_started", "qo_worker_stopping"]


def test_a_worker_run_is_counted_by_type_and_event(tmp_path):
    # unique task types: the process's registry also sees other tests' tasks
    ok, bad, flaky = (f"{name}_{uuid.uuid4().hex[:8]}" for name in ("ok", "bad", "flaky"))

    async def main() -> None:
        queue = await qo.connect(str(tmp_path / "q"))
        try:
            for i in range(3):
                await queue.submit(ok, {"i": i})
            await queue.submit(bad, None)
            await queue.submit(flaky, None)
            worker = fast_worker(queue)

            @worker.handler(ok)
            async def succeed(input):
                return input

            @worker.handler(bad)
            async def fail(input):
                raise qo.Fail("no")

            @worker.handler(flaky)
            async def once(input, ctx):
                if ctx.attempt == 1:
                    raise qo.Retry(delay=0)
                return "second time"

            await worker.run(until_idle=True)
        finally:
            await queue.close()

    asyncio.run(main())
    got = samples(METRICS.exposition())
    counts = {(labels["task_type"], labels["event"]): v
              for (name, labels_t), v in got.items() if name == "qo_tasks_total"
              for labels in [dict(labels_t)] if labels["task_type"] in (ok, bad, flaky)}
    assert counts == {
        (ok, "submitted"): 3, (ok, "started"): 3, (ok, "succeeded"): 3,
        (bad, "submitted"): 1, (bad, "started"): 1, (bad, "failed"): 1,
        (flaky, "submitted"): 1, (flaky, "started"): 2, (flaky, "retried"): 1, (flaky, "succeeded"): 1,
    }
    runs = {(t, o): value(got, "qo_task_run_seconds_count", task_type=t, outcome=o)
            for t in (ok, bad, flaky) for o in ("succeeded", "failed", "retried")}
    assert {k: v for k, v in runs.items() if v} == {
        (ok, "succeeded"): 3, (bad, "failed"): 1, (flaky, "retried"): 1, (flaky, "succeeded"): 1}
    for t, o in [(ok, "succeeded"), (bad, "failed"), (flaky, "retried"), (flaky, "succeeded")]:
        total = value(got, "qo_task_run_seconds_sum", task_type=t, outcome=o)
        assert 0 <= total < 10
    # queue wait: once per task, on its first attempt only
    assert value(got, "qo_task_queue_wait_seconds_count", task_type=ok) == 3
    assert value(got, "qo_task_queue_wait_seconds_count", task_type=flaky) == 1
    assert value(got, "qo_task_queue_wait_seconds_bucket", task_type=ok, le="+Inf") == 3


def test_durations_come_from_the_task_fields():
    m = Metrics()
    task = qo.Task(id="t1", task_type="mail", created_at=100.0, started_at=102.5, attempt=1)
    m.observe("started", task)
    task.finished_at = task.updated_at = 106.5
    m.observe("succeeded", task)
    # a manual revive (`qo retry` of a dead task) resets attempt to 0 and ran nothing
    m.observe("retried", qo.Task(id="t2", task_type="mail", started_at=1.0, updated_at=50.0, attempt=0))
    # a second attempt's start: not a queue wait
    m.observe("started", qo.Task(id="t3", task_type="mail", created_at=1.0, started_at=90.0, attempt=2))
    # a dependent failed without ever running: counted, not timed
    m.observe("failed", qo.Task(id="t4", task_type="mail", finished_at=3.0))
    got = samples(m.exposition())
    assert value(got, "qo_task_queue_wait_seconds_sum", task_type="mail") == 2.5
    assert value(got, "qo_task_queue_wait_seconds_count", task_type="mail") == 1
    assert value(got, "qo_task_run_seconds_sum", task_type="mail", outcome="succeeded") == 4.0
    assert value(got, "qo_task_run_seconds_count", task_type="mail", outcome="retried") is None
    assert value(got, "qo_task_run_seconds_count", task_type="mail", outcome="failed") is None
    assert value(got, "qo_tasks_total", task_type="mail", event="failed") == 1
    assert value(got, "qo_tasks_total", task_type="mail", event="started") == 2


HANDLERS = """
import qo

@qo.handler("{ok}")
async def ok(input):
    return input

@qo.handler("{bad}")
async def bad(input):
    raise qo.Fail("no")
"""


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return response.read().decode()


def test_a_real_worker_serves_its_counts_over_http(tmp_path):
    ok, bad, n = "scraped_ok", "scraped_bad", 5
    (tmp_path / "metrics_handlers.py").write_text(textwrap.dedent(HANDLERS.format(ok=ok, bad=bad)))
    url, port = str(tmp_path / "q"), free_port()
    env = {**os.environ, "QO_URL": url, "QO_QUEUE": "default"}
    env.pop("QO_DISABLE_PLUGINS", None)
    proc = subprocess.Popen(
        [*qo_command(), "worker", str(tmp_path / "metrics_handlers.py"), "--metrics-port", str(port),
         "--poll-max", "0.1", "--log-level", "WARNING"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async def submit() -> None:
            queue = await qo.connect(url)
            try:
                for i in range(n):
                    await queue.submit(ok, {"i": i})
                await queue.submit(bad, None)
            finally:
                await queue.close()

        asyncio.run(submit())
        deadline, text = time.monotonic() + 30, ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                text = scrape(port)
            except OSError:
                text = ""
            got = samples(text) if text else {}
            if value(got, "qo_tasks_total", task_type=ok, event="succeeded") == n \
                    and value(got, "qo_tasks_total", task_type=bad, event="failed") == 1:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the endpoint never showed {n} succeeded tasks:\n{text}")
        assert f'qo_tasks_total{{event="started",task_type="{ok}"}} {float(n)}' in text
        assert f'qo_tasks_total{{event="succeeded",task_type="{ok}"}} {float(n)}' in text
        assert f'qo_tasks_total{{event="failed",task_type="{bad}"}} 1.0' in text
        assert f'qo_task_run_seconds_count{{outcome="succeeded",task_type="{ok}"}} {float(n)}' in text
        assert f'qo_task_queue_wait_seconds_count{{task_type="{ok}"}} {float(n)}' in text
        # submitted in this process, not the worker's: the worker reports only what it saw
        assert 'event="submitted"' not in text
        assert "# TYPE qo_task_run_seconds histogram" in text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped" in err


def help_text(**env_overrides: str) -> str:
    env = {**os.environ, **env_overrides}
    if not env_overrides:
        env.pop("QO_DISABLE_PLUGINS", None)
    result = subprocess.run([*qo_command(), "worker", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_blocking_the_plugin_removes_the_option():
    assert "--metrics-port" in help_text()
    assert "--metrics-port" not in help_text(QO_DISABLE_PLUGINS="metrics")


def test_a_busy_port_is_a_usage_error(tmp_path):
    (tmp_path / "h.py").write_text("import qo\n\n@qo.handler('x')\ndef x(input):\n    return input\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "QO_URL": str(tmp_path / "q")}
        env.pop("QO_DISABLE_PLUGINS", None)
        result = subprocess.run([*qo_command(), "worker", str(tmp_path / "h.py"), "--metrics-port", str(port)],
                                env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot serve metrics" in result.stderr


def test_the_children_kept_between_events_are_the_ones_the_registry_exposes():
    m = Metrics()
    for i in range(3):
        task = qo.Task(id=f"t{i}", task_type="mail", created_at=1.0, started_at=2.0, attempt=1)
        m.observe("started", task)
        task.finished_at = 3.0
        m.observe("succeeded", task)
    m.observe("succeeded", qo.Task(id="t9", task_type="other", started_at=1.0, finished_at=1.5))
    got = samples(m.exposition())
    assert value(got, "qo_tasks_total", task_type="mail", event="started") == 3
    assert value(got, "qo_tasks_total", task_type="mail", event="succeeded") == 3
    assert value(got, "qo_task_queue_wait_seconds_count", task_type="mail") == 3
    assert value(got, "qo_task_run_seconds_sum", task_type="mail", outcome="succeeded") == 3.0
    assert value(got, "qo_task_run_seconds_count", task_type="other", outcome="succeeded") == 1
    assert m._child(m.tasks, "mail", "started") is m.tasks.labels(task_type="mail", event="started")
