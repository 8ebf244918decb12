"""``qo submit-many TYPE --input-lines @file.jsonl|-``: one task per line, ids in line order."""

from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from qo.model import MAX_INPUT_BYTES
from qo.cli import build_cli

from test_cli import tasks_in


def qo_cli(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(build_cli(), list(args), input=input, catch_exceptions=False)


def test_submit_many_from_a_file_prints_ids_in_line_order(storage_url, tmp_path):
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"n": 1}\n\n{"n": 2}\r\n"three"\n[4]\n')  # blank lines skipped, CRLF taken
    r = qo_cli("submit-many", "resize", "--input-lines", f"@{lines}", "--priority", "high",
               "--max-retries", "7", "--url", storage_url)
    assert r.exit_code == 0, r.output
    ids = r.stdout.split()
    assert len(ids) == 4 and "submitted 4 resize tasks to queue 'default'" in r.stderr
    by_id = {t.id: t for t in tasks_in(storage_url)}
    assert [by_id[i].input for i in ids] == [{"n": 1}, {"n": 2}, "three", [4]]
    assert {(t.task_type, t.priority, t.max_retries, t.status) for t in by_id.values()} == {
        ("resize", 192, 7, "pending")}


def test_submit_many_from_stdin_with_json_output(storage_url, monkeypatch):
    monkeypatch.setattr(sys.modules["qo.cli.submit_many"], "CHUNK", 10)  # several chunks, in line order
    data = "".join(json.dumps({"i": i}) + "\n" for i in range(25))
    r = qo_cli("submit-many", "t", "--input-lines", "-", "--json", "--quiet", "--url", storage_url, input=data)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["input"] for row in rows] == [{"i": i} for i in range(25)]
    assert r.stderr == ""
    assert len(tasks_in(storage_url)) == 25


def test_a_bad_line_is_named_and_nothing_is_written(storage_url, tmp_path):
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"ok": 1}\n{"ok": 2}\n{nope\n{"ok": 4}\n')
    r = qo_cli("submit-many", "t", "--input-lines", f"@{lines}", "--url", storage_url)
    assert r.exit_code == 1
    assert "error: --input-lines line 3: is not JSON" in r.stderr and r.stdout == ""
    assert tasks_in(storage_url) == []

    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"ok": 1}\n"' + b"x" * (MAX_INPUT_BYTES + 10) + b'"\n')
    r = qo_cli("submit-many", "t", "--input-lines", f"@{big}", "--url", storage_url)
    assert r.exit_code == 1 and "--input-lines line 2: is larger than" in r.stderr
    assert tasks_in(storage_url) == []


def test_submit_many_usage_errors(tmp_path):
    store = tmp_path / "never"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for args, message in [
        (["--input-lines", f"@{empty}"], "has no input lines"),
        (["--input-lines", f"@{tmp_path / 'missing.jsonl'}"], "cannot read"),
        (["--input-lines", "@"], "must be followed by a file path"),
        (["--input-lines", f"@{empty}", "--priority", "999"], None),
    ]:
        r = qo_cli("submit-many", "t", *args, "--url", str(store))
        assert r.exit_code == 1, (args, r.output)
        if message:
            assert message in r.stderr
    r = qo_cli("submit-many", "bad type!", "--input-lines", "-", "--url", str(store), input='{"a": 1}\n')
    assert r.exit_code == 1 and "task_type" in r.stderr
    r = qo_cli("submit-many", "t", "--input-lines", "-", "--priority", "999", "--url", str(store), input='1\n')
    assert r.exit_code == 1 and "priority" in r.stderr
    assert not store.exists()  # nothing was created for a refused run
