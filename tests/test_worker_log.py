"""What a worker prints (qo/worker_log.py, qo/cli/logs.py): a line per task event, the
summary while busy, the json format, the SDK loggers held at WARNING."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import attrs
import pytest
from click.testing import CliRunner

import qo
from qo.cli import build_cli
from qo.cli.logs import SDK_LOGGERS, JsonFormatter, location, setup_logging
from qo.clock import FakeClock
from qo.model import Task
from qo.worker import Worker
from qo.worker_log import TaskLog


def task_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "qo.worker.tasks"]


def of(records, task_id: str) -> list[tuple[str, str]]:
    """(level, message without the 'task ID TYPE (queue q): ' head) of one task's lines."""
    out = []
    for r in records:
        if r.task_id == task_id:
            head, _, rest = r.getMessage().partition(": ")
            out.append((r.levelname, rest))
    return out


async def test_one_line_per_task_event(queue, fast_settings, caplog):
    caplog.set_level(logging.INFO, logger="qo.worker")
    ok = await queue.submit("ok", 1)
    flaky = await queue.submit("flaky", 2, max_retries=3)
    bad = await queue.submit("bad", 3, max_retries=0)
    slow = await queue.submit("slow", 4, max_retries=0, timeout_seconds=0.2)
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("ok")
    async def ok_(value):
        return value

    @worker.handler("flaky")
    async def flaky_(value, ctx):
        if ctx.attempt == 1:
            raise ValueError("not yet")
        return value

    @worker.handler("bad")
    def bad_(value):
        raise RuntimeError("always broken")

    @worker.handler("slow")
    async def slow_(value):
        await asyncio.Event().wait()

    await worker.run(until_idle=True)
    records = task_lines(caplog)
    for r in records:  # every line names the task, its type and queue (not "default": said)
        assert r.getMessage().startswith(f"task {r.task_id} {r.task_type} (queue q): ")
        assert r.queue == "q" and r.worker_id == worker.worker_id and r.event

    (started, done) = of(records, ok.id)
    assert started == ("INFO", "started (attempt 1/4)")
    assert done[0] == "INFO" and re.fullmatch(r"completed in \d+ ms", done[1])

    lines = of(records, flaky.id)
    assert [m.split(" ")[0] for _, m in lines] == ["started", "retry", "started", "completed"]
    assert lines[1][0] == "WARNING" and re.fullmatch(r"retry 2/4 in \d(\.\d)? s: ValueError: not yet", lines[1][1])
    assert lines[2][1] == "started (attempt 2/4)"

    lines = of(records, bad.id)
    assert lines[1] == ("ERROR", "failed (dead letter) after 1 attempt: RuntimeError: always broken")
    (dead,) = [r for r in records if r.task_id == bad.id and r.event == "failed"]
    assert dead.exc_info is not None and dead.error == "RuntimeError: always broken"
    assert "Traceback" in dead.traceback and "in bad_" in dead.traceback  # the handler's own frame

    assert of(records, slow.id) == [
        ("INFO", "started (attempt 1/1)"), ("WARNING", "timed out after 0.2 s"),
        ("ERROR", "failed (dead letter) after 1 attempt: TimeoutError: handler exceeded timeout_seconds=0.2")]
    fields = {r.event: r for r in records if r.task_id == slow.id}
    assert fields["timed_out"].duration_ms == 200 and fields["failed"].attempt == 1


def test_the_json_format_has_the_event_fields():
    clock = FakeClock(1_800_000_000.0)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("qo.worker.tasks")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        log = TaskLog("w-1-abcdef", "default", clock)
        task = Task(id="0" * 24, task_type="resize", attempt=2, max_retries=3)
        log.started(task)
        log.completed(task, 0.0125)
        try:
            raise ValueError("no such image\nsecond line")
        except ValueError as exc:
            log.retried(task, exc, 0.004, 8)
            task.attempt = 4
            log.failed(task, exc, 0.004)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 4  # one object per line, a traceback included
    first = lines[0]
    assert set(first) == {"ts", "level", "logger", "message", "event", "task_id", "task_type", "queue", "attempt",
                          "worker_id"}
    assert first["level"] == "INFO" and first["logger"] == "qo.worker.tasks" and first["ts"].endswith("+00:00")
    assert first["message"] == f"task {'0' * 24} resize: started (attempt 2/4)"  # queue "default": not said
    assert lines[1]["duration_ms"] == 12 and lines[1]["message"].endswith("completed in 12 ms")
    assert lines[2]["message"].endswith("retry 3/4 in 8 s: ValueError: no such image")
    assert lines[2]["error"] == "ValueError: no such image" and lines[2]["level"] == "WARNING"
    assert lines[3]["event"] == "failed" and lines[3]["level"] == "ERROR" and lines[3]["attempt"] == 4
    assert lines[3]["message"].endswith("failed (dead letter) after 4 attempts: ValueError: no such image")
    assert lines[3]["traceback"].startswith("Traceback") and "second line" in lines[3]["traceback"]


def test_the_summary_says_what_happened_in_the_interval_and_nothing_when_idle(caplog):
    caplog.set_level(logging.INFO, logger="qo.worker")
    clock = FakeClock(1_800_000_000.0)
    log = TaskLog("w-1-abcdef", "default", clock)
    task = Task(id="0" * 24, task_type="t")
    for _ in range(30):
        log.started(task)
        log.completed(task, 0.01)
    log.failed(task, None, None)
    clock.advance(10)
    message = log.summary(running=3)
    assert message == ("worker w-1-abcdef: 3.1 tasks/s over 10 s: 30 started, 30 completed, 1 failed; "
                       "3 running")
    (record,) = [r for r in caplog.records if r.name == "qo.worker.summary"]
    assert record.tasks_per_s == 3.1 and record.completed == 30 and record.failed == 1 and record.running == 3
    clock.advance(10)
    assert log.summary(running=3) is None  # nothing started or ended: silent
    assert len([r for r in caplog.records if r.name == "qo.worker.summary"]) == 1


async def test_a_busy_worker_logs_summaries_an_idle_one_none(tmp_path, fast_settings, caplog):
    caplog.set_level(logging.INFO, logger="qo.worker")
    queue = await qo.connect(str(tmp_path / "s"), queue="q")
    worker = Worker(queue, settings=attrs.evolve(fast_settings, log_summary_interval=0.1))
    worker.handler("t")(lambda v: v)
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.35)  # idle: nothing to say
    assert not [r for r in caplog.records if r.name == "qo.worker.summary"]
    for i in range(5):
        await queue.submit("t", i)
    for _ in range(100):
        if worker.stats["completed"] == 5:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.15)
    worker.stop()
    await run
    await queue.close()
    summaries = [r for r in caplog.records if r.name == "qo.worker.summary"]
    assert summaries and sum(r.completed for r in summaries) == 5
    assert any(r.tasks_per_s > 0 for r in summaries)  # a summary may fall between start and end


@pytest.mark.parametrize("level, expected", [("INFO", logging.WARNING), ("warning", logging.WARNING),
                                             ("DEBUG", logging.DEBUG)])
def test_sdk_loggers_are_quiet_unless_debug(level, expected):
    setup_logging(level, "text", stream=io.StringIO())
    for name in ("botocore", "aiobotocore", "azure", "azure.core", "s3fs", "urllib3", "fsspec"):
        assert name in SDK_LOGGERS and logging.getLogger(name).level == expected
    assert logging.getLogger().level == getattr(logging, level.upper())
    assert not logging.getLogger("azure.core.pipeline.policies.http_logging_policy").isEnabledFor(logging.INFO) \
        or expected == logging.DEBUG


def test_location_is_absolute_or_redacted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location(".qo") == str(tmp_path / ".qo")
    assert location("file:///srv/q?mode=group") == "/srv/q?mode=..."
    assert location("s3://AKIA:secret@bucket/p?token=x") == "s3://bucket/p?token=..."


HANDLERS = """
import qo

@qo.handler("ok{n}")
async def ok(value):
    return value

@qo.handler("bad{n}")
async def bad(value):
    raise ValueError("broken")
"""  # types named per test: @qo.handler registers process-wide


def test_qo_worker_log_format_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "log_handlers_json.py").write_text(HANDLERS.format(n=""))
    url = str(tmp_path / "store")
    runner = CliRunner()
    assert runner.invoke(build_cli(), ["submit", "ok", "--url", url]).exit_code == 0
    assert runner.invoke(build_cli(), ["submit", "bad", "--max-retries", "0", "--url", url]).exit_code == 0
    result = runner.invoke(build_cli(), ["worker", "log_handlers_json.py", "--until-idle", "--log-format", "json",
                                         "--poll-max", "0.1", "--url", url])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line parses
    assert {"ts", "level", "logger", "message"} <= set(lines[0])
    assert lines[0]["message"].startswith("worker ") and f"at {url}:" in lines[0]["message"]
    events = {(l["event"], l.get("task_type")) for l in lines if "event" in l}
    assert {("started", "ok"), ("completed", "ok"), ("started", "bad"), ("failed", "bad")} <= events
    (dead,) = [l for l in lines if l.get("event") == "failed"]
    assert dead["level"] == "ERROR" and dead["error"] == "ValueError: broken" and "Traceback" in dead["traceback"]
    assert lines[-1]["event"] == "stopped" and "completed 1" in lines[-1]["message"]


def test_qo_worker_text_format_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "log_handlers_text.py").write_text(HANDLERS.format(n="2"))
    url = str(tmp_path / "store")
    runner = CliRunner()
    runner.invoke(build_cli(), ["submit", "ok2", "--url", url])
    result = runner.invoke(build_cli(), ["worker", "log_handlers_text.py", "--until-idle", "--url", url])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"INFO qo.worker.tasks: task \w+ ok2: completed in \d+ ms", result.stderr)
    monkeypatch.setenv("QO_LOG_FORMAT", "json")
    (tmp_path / "log_handlers_env.py").write_text(HANDLERS.format(n="3"))
    runner.invoke(build_cli(), ["submit", "ok3", "--url", url])
    result = runner.invoke(build_cli(), ["worker", "log_handlers_env.py", "--until-idle", "--url", url])
    assert result.exit_code == 0, result.stderr
    assert all(json.loads(line) for line in result.stderr.splitlines())


def test_a_bad_log_format_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(build_cli(), ["worker", "h.py", "--log-format", "xml", "--url", str(tmp_path)])
    assert result.exit_code == 2 and "--log-format" in result.stderr and "xml" in result.stderr
    result = CliRunner().invoke(build_cli(), ["schedule", "run", "--log-format", "xml", "--url", str(tmp_path)])
    assert result.exit_code == 2 and "--log-format" in result.stderr
