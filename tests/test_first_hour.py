"""The first hour: what a new user reads and types works as written (issue 18, item 7)."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from qo.cli import build_cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("plugins/*/README.md")), *sorted((ROOT / "docs").glob("*.md"))]


def qo_cli(*args: str):
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """``qo ...`` command lines inside the ```sh blocks of a Markdown file (a line
    ending in a backslash goes on on the next one)."""
    out, in_sh, pending = [], False, None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            in_sh, pending = line.strip() in ("```sh", "```bash", "```console"), None
            continue
        if not in_sh:
            continue
        text = line.split(" #")[0].strip()
        if pending is not None:
            start, head = pending
            text = head + " " + text
        else:
            start = number
        if text.endswith("\\"):
            pending = (start, text[:-1].strip())
            continue
        pending = None
        if text.startswith("qo "):
            out.append((start, text))
    return out


def parse(cli: click.Group, argv: list[str]) -> None:
    """Parse ``argv`` as the CLI would, running nothing (``UsageError`` if it cannot)."""
    parent = cli.make_context("qo", [], resilient_parsing=True)
    cmd: click.Command = cli
    name = "qo"
    while isinstance(cmd, click.Group) and argv and not argv[0].startswith("-"):
        sub = cmd.get_command(parent, argv[0])
        if sub is None:
            raise click.UsageError(f"no such command {argv[0]!r} under {name}")
        name, cmd, argv = argv[0], sub, argv[1:]
    cmd.make_context(name, list(argv), parent=parent)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_qo_command_line_in_the_docs_parses(doc, monkeypatch):
    try:  # parsing `--metrics-port 9464` would serve metrics on that port: what a run does, not a parse
        import qo_metrics.plugin
    except ImportError:
        pass
    else:
        monkeypatch.setattr(qo_metrics.plugin, "serve", lambda port, addr="127.0.0.1": None)
    cli = build_cli()
    bad = []
    for number, text in shell_lines(doc):
        if re.search(r"\[|\||\.\.\.|<", text):  # a synopsis ([optional], a|b, ...): not a command as typed
            continue
        try:
            parse(cli, shlex.split(text)[1:])
        except click.UsageError as exc:
            bad.append(f"{doc.name}:{number}: {text}: {exc.format_message()}")
    assert not bad, "\n".join(bad)


def test_the_docs_iterate_listings_with_async_for_and_say_nothing_is_unbuilt():
    readme = (ROOT / "README.md").read_text()
    assert "await queue.list(" not in readme and "async for t in queue.list(" in readme
    assert "not built yet" not in (ROOT / "docs" / "architecture.md").read_text()
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    assert "/work/" not in bench and "../shared/bench" in bench
    assert "--import" not in (ROOT / "plugins" / "qo-azure" / "README.md").read_text()


def test_limit_list_and_settings_have_headers(tmp_path):
    url = str(tmp_path / "store")
    assert qo_cli("limit", "set", "global", "--rate", "5", "--url", url).exit_code == 0
    out = qo_cli("limit", "list", "--url", url).stdout.splitlines()
    assert out[0].split() == ["SCOPE", "LIMIT", "NOW"] and out[1].startswith("global")
    out = qo_cli("settings", "--url", url).stdout.splitlines()
    assert out[0].split() == ["SETTING", "VALUE", "SOURCE", "MEANING"]


def test_settings_set_without_a_value_is_a_usage_error(tmp_path):
    url = str(tmp_path / "store")
    r = qo_cli("settings", "set", "max_retries", "--url", url)
    assert r.exit_code == 2 and "is not NAME=VALUE" in r.stderr
    r = qo_cli("settings", "set", "max_retries=many", "--url", url)
    assert r.exit_code == 1 and "max_retries" in r.stderr
    assert not (tmp_path / "store").exists()


def test_the_demo_hints_name_a_qo_that_runs(monkeypatch):
    from qo import demo

    beside = os.path.join(os.path.dirname(sys.executable), "qo")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert demo.qo_command() == (beside if os.path.exists(beside) else "qo")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    assert demo.qo_command() == "qo"


def test_a_worker_on_a_missing_bucket_says_so_first(moto_server, tmp_path):
    import subprocess

    (tmp_path / "mb_handlers.py").write_text("import qo\n\n@qo.handler('mb')\ndef mb(i):\n    return i\n")
    url = moto_server.url("p", bucket="no-such-bucket")
    qo_bin = Path(sys.executable).with_name("qo")
    done = subprocess.run([str(qo_bin), "worker", "mb_handlers.py", "--until-idle", "--url", url],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert "error: bucket 'no-such-bucket' does not exist" in done.stderr
    assert "could not be read" not in done.stderr and "Traceback" not in done.stderr


def test_dev_py_keeps_pip_quiet_unless_it_fails(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("qo_dev_script", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    noisy = [sys.executable, "-c", "import sys\nfor i in range(169): print('WARNING: Location ignored', i)"]
    dev._quietly(noisy)
    assert capsys.readouterr().out == ""  # 169 warnings, none shown
    failing = [sys.executable, "-c", "print('ERROR: no matching distribution'); raise SystemExit(3)"]
    with pytest.raises(SystemExit) as e:
        dev._quietly(failing)
    assert "pip failed (exit 3)" in str(e.value)
    assert "ERROR: no matching distribution" in capsys.readouterr().out
