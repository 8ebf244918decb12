"""The ``qo`` command line (task commands, worker, doctor, plugins) and ``python -m qo.demo``.

Storage-facing tests run on local and on S3 (moto) through the ``storage_url`` fixture.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import qo
from qo.model import MAX_INPUT_BYTES, Task
from qo.stored import MAX_VALUE_DEPTH
from qo.cli import build_cli
from qo.cli.parsing import delay_to_time, parse_duration, parse_json_input, parse_time
from qo.cli.worker import summary

QO = Path(sys.executable).with_name("qo")


def qo_cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(build_cli(), list(args), input=input, catch_exceptions=False)


def tasks_in(url: str, queue: str = "default") -> list[Task]:
    async def go():
        async with await qo.connect(url, queue=queue) as q:
            return [t async for t in q.list(limit=None)]

    return asyncio.run(go())


def status_json(url: str, task_id: str) -> dict:
    result = qo_cli("status", task_id, "--json", "--url", url)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def submit(url: str, *args: str, input: str | None = None) -> str:
    result = qo_cli("submit", *args, "--url", url, input=input)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("QO_URL", None)
    env.pop("QO_QUEUE", None)
    return env


# -- pure parsing helpers ------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("10s", 10), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1.5s", 1.5), ("30", 30), ("0.25", 0.25),
    ("250ms", 0.25), (" 2H ", 7200), (".5", 0.5), ("0", 0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-5s", "10x", "1h30m", "nan", "inf", "1e3", "ten"])
def test_parse_duration_rejects(text):
    with pytest.raises(qo.InvalidInput) as exc:
        parse_duration(text)
    assert exc.value.field == "--delay"


def test_parse_time():
    assert parse_time("2030-01-02T03:04:05Z") == datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    t = parse_time("2030-01-02T05:04:05+02:00")
    assert t.timestamp() == datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    fixed = datetime(2031, 1, 1, tzinfo=timezone.utc)
    assert parse_time("now", now=fixed) == fixed
    assert parse_time(" NOW ").tzinfo is not None
    for bad in ("2030-01-02T03:04:05", "2030-01-02", "tomorrow", ""):
        with pytest.raises(qo.InvalidInput) as exc:
            parse_time(bad)
        assert exc.value.field == "--at"
    with pytest.raises(qo.InvalidInput, match="timezone"):
        parse_time("2030-01-02 03:04")


def test_delay_to_time():
    assert delay_to_time(90, 1_800_000_000.0).timestamp() == 1_800_000_090.0
    with pytest.raises(qo.InvalidInput, match="--delay"):
        delay_to_time(1e15, 1_800_000_000.0)


def test_parse_json_input(tmp_path, monkeypatch):
    monkeypatch.setattr(qo.model, "MAX_PAYLOAD_BYTES", MAX_INPUT_BYTES)  # the sizes below, not 100 MiB
    assert parse_json_input(None) is None
    assert parse_json_input('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_json_input("3") == 3
    f = tmp_path / "in.json"
    f.write_text('{"from": "file"}')
    assert parse_json_input(f"@{f}") == {"from": "file"}
    assert parse_json_input("@-", stdin=io.StringIO('["stdin"]')) == ["stdin"]
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    (tmp_path / "latin1.json").write_bytes(b'"\xe9"')
    for bad in ("{", "NaN", "", "@", f"@{tmp_path / 'missing.json'}", deep, f"@{tmp_path / 'deep.json'}",
                f"@{tmp_path / 'latin1.json'}", f"@{tmp_path}", "1" * (MAX_INPUT_BYTES + 1)):
        with pytest.raises(qo.InvalidInput) as exc:
            parse_json_input(bad)
        assert exc.value.field == "--input"
    too_large = ("1" * (MAX_INPUT_BYTES + 1), '"' + "é" * 140_000 + '"')  # the second by its UTF-8 bytes
    for stdin in (io.StringIO(deep), *(io.StringIO(t) for t in too_large)):
        with pytest.raises(qo.InvalidInput) as exc:  # a text stream without a buffer is bounded too
            parse_json_input("@-", stdin=stdin)
        assert exc.value.field == "--input"


def test_summary_line():
    import collections

    line = summary("w1", collections.Counter(completed=3, claimed=4, missed=0))
    assert line == "worker w1 stopped: claimed 4, completed 3"
    assert "nothing done" in summary("w1", collections.Counter())


# -- task commands on both backends ---------------------------------------------------


def test_submit_then_status(storage_url):
    task_id = submit(storage_url, "send_email", "--input", '{"to": "a@b.c"}', "--priority", "7")
    assert len(task_id) == 24
    task = status_json(storage_url, task_id)
    assert (task["id"], task["status"], task["priority"], task["input"]) == (task_id, "pending", 7, {"to": "a@b.c"})

    human = qo_cli("status", task_id, "--url", storage_url)
    assert human.exit_code == 0
    for text in (task_id, "send_email", "pending", "attempt:    0/4", "created:", '"to": "a@b.c"'):
        assert text in human.stdout


def test_submit_json_options(storage_url):
    result = qo_cli("submit", "t", "--priority", "high", "--max-retries", "0", "--timeout", "12.5",
                    "--json", "--url", storage_url)
    assert result.exit_code == 0, result.output
    task = json.loads(result.stdout)
    assert (task["priority"], task["max_retries"], task["timeout_seconds"]) == (192, 0, 12.5)
    assert status_json(storage_url, task["id"])["priority"] == 192


def test_submit_delay_and_at(storage_url):
    before = datetime.now(timezone.utc)
    task = status_json(storage_url, submit(storage_url, "t", "--delay", "1h"))
    delay = when(task["available_at"]) - before
    assert timedelta(minutes=59) < delay < timedelta(minutes=61)
    # the delay counts from the command's clock reading; the task is created a few round trips later
    assert when(task["available_at"]) - when(task["created_at"]) == pytest.approx(timedelta(hours=1), abs=timedelta(seconds=10))

    task = status_json(storage_url, submit(storage_url, "t", "--at", "2040-05-06T07:08:09+02:00"))
    assert when(task["available_at"]) == datetime(2040, 5, 6, 5, 8, 9, tzinfo=timezone.utc)


def test_submit_input_from_file_and_stdin(storage_url, tmp_path):
    f = tmp_path / "input.json"
    f.write_text('{"big": [1, 2, 3]}')
    assert status_json(storage_url, submit(storage_url, "t", "--input", f"@{f}"))["input"] == {"big": [1, 2, 3]}
    assert status_json(storage_url, submit(storage_url, "t", "--input", "@-", input='"piped"'))["input"] == "piped"


def _one_error_line(result: Result, option: str) -> str:
    """The single stderr line of a refused command (exit 1), naming ``option``."""
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {option}: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    return result.stderr


def test_input_files_and_stdin_are_read_only_up_to_the_limit(storage_url, tmp_path, monkeypatch):
    """A 1 GB (sparse) --input file is refused naming --input and the limit, having read
    at most the limit + 1 bytes; the same over standard input; a file of exactly the
    limit is a task's input. The limit is the payload cap (``MAX_PAYLOAD_BYTES``), set
    here to 256 KiB so the test moves kilobytes, not 100 MiB."""
    import builtins

    from qo.cli import parsing

    monkeypatch.setattr(qo.model, "MAX_PAYLOAD_BYTES", MAX_INPUT_BYTES)
    read: list[int] = []  # bytes each read of an input file returned (counted where it happens,
    #                       unlike a process-wide memory peak, which other threads can raise)

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(parsing, "open", lambda *a, **k: Counted(builtins.open(*a, **k)), raising=False)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(10**9)
    result = qo_cli("submit", "t", "--input", f"@{huge}", "--url", storage_url)
    line = _one_error_line(result, "--input")
    assert str(MAX_INPUT_BYTES) in line and "huge.json" in line
    assert 0 < sum(read) <= MAX_INPUT_BYTES + 1  # the whole file would be 10**9
    dev_zero = qo_cli("submit", "t", "--input", "@/dev/zero", "--url", storage_url)  # endless
    assert str(MAX_INPUT_BYTES) in _one_error_line(dev_zero, "--input")

    over = json.dumps("x" * (MAX_INPUT_BYTES - 1))  # limit + 1 bytes
    piped = qo_cli("submit", "t", "--input", "@-", "--url", storage_url, input=over)
    assert "standard input" in _one_error_line(piped, "--input") and str(MAX_INPUT_BYTES) in piped.stderr
    assert tasks_in(storage_url) == []

    at_limit = tmp_path / "at_limit.json"
    at_limit.write_text(json.dumps("x" * (MAX_INPUT_BYTES - 2)))
    assert at_limit.stat().st_size == MAX_INPUT_BYTES
    task_id = submit(storage_url, "t", "--input", f"@{at_limit}")  # over 64 KiB: stored apart
    shown = qo_cli("status", task_id, "--json", "--payloads", "--url", storage_url)
    assert json.loads(shown.stdout)["input"] == "x" * (MAX_INPUT_BYTES - 2)


DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_is_one_error_line_at_every_cli_entry_point(storage_url, tmp_path):
    """100,000-deep JSON (and one level over the limit) through --input, @file, @-,
    schedule add --input, submit-graph and settings set: exit 1, one line naming the
    option, no RecursionError traceback, nothing written."""
    deep_file = tmp_path / "deep.json"
    deep_file.write_text(DEEP)
    over = "[" * (MAX_VALUE_DEPTH + 1) + "]" * (MAX_VALUE_DEPTH + 1)
    cases = [
        (["submit", "t", "--input", DEEP], None, "--input"),
        (["submit", "t", "--input", over], None, "--input"),
        (["submit", "t", "--input", f"@{deep_file}"], None, "--input"),
        (["submit", "t", "--input", "@-"], DEEP, "--input"),
        (["schedule", "add", "s", "--cron", "* * * * *", "--type", "t", "--input", DEEP], None, "--input"),
        (["schedule", "add", "s", "--cron", "* * * * *", "--type", "t", "--input", f"@{deep_file}"], None,
         "--input"),
        (["submit-graph", '{"a": {"task_type": "t", "input": ' + DEEP + "}}"], None, "JSON"),
        (["submit-graph", f"@{deep_file}"], None, "JSON"),
        (["settings", "set", f"max_retries={DEEP}"], None, "settings.max_retries"),
    ]
    for args, stdin, option in cases:
        line = _one_error_line(qo_cli(*args, "--url", storage_url, input=stdin), option)
        assert len(line) < 300, line
        if option != "settings.max_retries":  # a setting is a number: refused as one
            assert "levels deep (arrays and objects); that is the limit" in line, line
    assert tasks_in(storage_url) == [] and qo_cli("schedule", "list", "--url", storage_url).stdout.count("\n") <= 1
    at_limit = "[" * MAX_VALUE_DEPTH + "]" * MAX_VALUE_DEPTH  # a task's input may be this deep, also in a graph
    submit(storage_url, "t", "--input", at_limit)
    graph = qo_cli("submit-graph", '{"a": {"task_type": "t", "input": ' + at_limit + "}}", "--url", storage_url)
    assert graph.exit_code == 0, graph.output
    assert [t.input for t in tasks_in(storage_url)] == [json.loads(at_limit)] * 2


@pytest.mark.parametrize("args, code, names", [
    (["--at", "2030-01-01T00:00:00"], 1, "--at"),
    (["--priority", "300"], 1, "priority"),
    (["--priority", "urgent"], 1, "priority"),
    (["--input", "{not json"], 1, "--input"),
    (["--delay", "soon"], 1, "--delay"),
    (["--max-retries", "-1"], 1, "max_retries"),
    (["--at", "now", "--delay", "5s"], 2, "--at and --delay"),
])
def test_submit_errors_write_nothing(storage_url, args, code, names):
    result = qo_cli("submit", "t", *args, "--url", storage_url)
    assert result.exit_code == code, result.output
    assert names in result.stderr
    if code == 1:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert tasks_in(storage_url) == []


def test_submit_bad_task_type(storage_url):
    result = qo_cli("submit", "a/b", "--url", storage_url)
    assert result.exit_code == 1
    assert "task_type" in result.stderr
    assert tasks_in(storage_url) == []


def test_status_unknown_and_malformed(storage_url):
    result = qo_cli("status", "0123456789abcdef01234567", "--url", storage_url)
    assert result.exit_code == 1
    assert "not found" in result.stderr and "'default'" in result.stderr
    result = qo_cli("status", "nope", "--url", storage_url)
    assert result.exit_code == 1
    assert "task_id" in result.stderr


def test_list(storage_url):
    a = submit(storage_url, "alpha", "--priority", "low")
    b = submit(storage_url, "beta")
    assert qo_cli("cancel", b, "--url", storage_url).exit_code == 0

    result = qo_cli("list", "--status", "pending", "--json", "--url", storage_url)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["id"], r["status"], r["priority"]) for r in rows] == [(a, "pending", 64)]

    table = qo_cli("list", "--url", storage_url).stdout.splitlines()
    assert table[0].split() == ["ID", "TYPE", "STATUS", "PRIORITY", "ATTEMPT", "UPDATED"]
    assert [line.split()[:5] for line in table[1:]] == [[a, "alpha", "pending", "64", "0/4"],
                                                       [b, "beta", "cancelled", "128", "0/4"]]
    assert qo_cli("list", "--type", "beta", "--json", "--url", storage_url).stdout.count("\n") == 1
    assert qo_cli("list", "--limit", "1", "--json", "--url", storage_url).stdout.count("\n") == 1
    empty = qo_cli("list", "--status", "failed", "--url", storage_url)
    assert (empty.exit_code, empty.stdout) == (0, "")
    assert qo_cli("list", "--status", "bogus", "--url", storage_url).exit_code == 2


def test_cancel_and_retry(storage_url):
    task_id = submit(storage_url, "t")
    result = qo_cli("cancel", task_id, "--url", storage_url)
    assert (result.exit_code, result.stdout) == (0, "cancelled\n")
    assert status_json(storage_url, task_id)["status"] == "cancelled"

    again = qo_cli("cancel", task_id, "--url", storage_url)
    assert again.exit_code == 1 and "already cancelled" in again.stderr

    result = qo_cli("retry", task_id, "--url", storage_url)
    assert (result.exit_code, result.stdout) == (0, "pending\n")
    assert status_json(storage_url, task_id)["status"] == "pending"

    not_failed = qo_cli("retry", task_id, "--url", storage_url)
    assert not_failed.exit_code == 1 and "pending" in not_failed.stderr


def test_queue_option_separates_queues(storage_url):
    task_id = submit(storage_url, "t", "--queue", "other")
    assert qo_cli("status", task_id, "--url", storage_url).exit_code == 1
    assert qo_cli("status", task_id, "--url", storage_url, "--queue", "other").exit_code == 0
    assert qo_cli("list", "--url", storage_url, "--queue", "bad/name").exit_code == 1


# -- worker, doctor, plugins, demo ----------------------------------------------------

HANDLERS = '''
import qo
from qo.model import MAX_INPUT_BYTES, Task
from qo.stored import MAX_VALUE_DEPTH
from qo.handlers import handler

@handler("greet")
def greet(input):
    return {"hello": input["name"]}

@handler("boom")
async def boom(input, ctx):
    raise qo.Fail("no luck on attempt %d" % ctx.attempt)
'''


def run_qo(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [str(QO)] if QO.exists() else [sys.executable, "-c", "from qo.cli import main; main()"]
    return subprocess.run(cmd + list(args), cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_worker_until_idle(storage_url, tmp_path):
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "tests_module.py").write_text(textwrap.dedent(HANDLERS))
    (tmp_path / "handlers" / "tests_helpers.py").write_text("def salute():\n    return 'hello'\n")
    greet = [submit(storage_url, "greet", "--input", json.dumps({"name": n})) for n in ("ann", "bob")]
    boom = submit(storage_url, "boom", "--max-retries", "5")
    other = submit(storage_url, "not_handled")

    proc = run_qo("worker", "handlers/tests_module.py", "--until-idle", "--concurrency", "2", "--poll-max", "0.2",
                  "--log-level", "warning", "--url", storage_url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "completed 2" in proc.stderr and "failed 1" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("worker ")

    assert [status_json(storage_url, t)["output"] for t in greet] == [{"hello": "ann"}, {"hello": "bob"}]
    human = qo_cli("status", greet[0], "--url", storage_url).stdout
    assert "completed" in human and 'output:     {"hello": "ann"}' in human
    dead = status_json(storage_url, boom)
    assert (dead["status"], dead["attempt"], dead["last_error"]["type"]) == ("failed", 1, "Fail")
    assert "Fail: no luck on attempt 1" in qo_cli("status", boom, "--url", storage_url).stdout
    assert status_json(storage_url, other)["status"] == "pending"


def test_worker_without_handlers(tmp_path):
    (tmp_path / "empty_module.py").write_text("X = 1\n")
    proc = run_qo("worker", "empty_module.py", "--until-idle", "--url", str(tmp_path / "store"), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no handlers found in empty_module.py")
    proc = run_qo("worker", "no_such_module", "--url", str(tmp_path / "store"), cwd=tmp_path)
    assert proc.returncode == 1 and "no_such_module" in proc.stderr and "Traceback" not in proc.stderr
    assert run_qo("worker", "--url", str(tmp_path / "store"), cwd=tmp_path).returncode == 2
    assert "@qo.handler(" in run_qo("worker", "empty_module.py", "--url", str(tmp_path / "store"),
                                    cwd=tmp_path).stderr  # the decorator the README shows


def test_a_handler_module_that_raises_on_import_is_one_line(tmp_path):
    (tmp_path / "broken_handlers.py").write_text("import qo\n\nSETTINGS = {}\nKEY = SETTINGS['api_key']\n")
    for module in ("broken_handlers.py", "broken_handlers"):
        proc = run_qo("worker", module, "--until-idle", "--url", str(tmp_path / "store"), cwd=tmp_path)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: cannot import handlers from {module}: KeyError: 'api_key' (at ")
        assert "broken_handlers.py:4)" in lines[0]
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    proc = run_qo("worker", "bad_syntax.py", "--url", str(tmp_path / "store"), cwd=tmp_path)
    assert proc.returncode == 1 and "SyntaxError" in proc.stderr and "bad_syntax.py:1)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "store").exists()


def test_doctor(storage_url):
    result = qo_cli("doctor", "--url", storage_url)
    assert result.exit_code == 0, result.output
    assert "healthy" in result.stdout


def test_plugins():
    result = qo_cli("plugins")
    assert result.exit_code == 0
    names = {line.split()[0] for line in result.stdout.splitlines() if line and not line[0].isspace()}
    assert {"local", "s3"} <= names


def test_demo(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qo.demo", "--url", str(tmp_path / "store"), "--tasks", "30"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert ["completed", "29"] in lines and ["failed", "1"] in lines
    assert "qo list" in proc.stdout and "--status failed" in proc.stdout and "tasks/s" in proc.stdout
