"""``qo dashboard`` on the command line: the plugin's hook adds it; safe defaults; the
real server started as a user would, and what it prints on stderr."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from qo.cli import build_cli

QO = Path(sys.executable).with_name("qo")


def _cli():
    return build_cli()  # qo's root group with every plugin's commands: ours through the entry point


def test_help_lists_the_options():
    result = CliRunner().invoke(_cli(), ["dashboard", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--url", "--queue", "--host", "--port", "--allow-actions", "--auth-token", "--refresh",
                   "--prices", "--insecure-no-auth", "--allowed-host", "QO_DASHBOARD_TOKEN", "127.0.0.1", "8377"):
        assert option in result.output


def test_non_loopback_host_without_token_is_refused(tmp_path):
    result = CliRunner().invoke(_cli(), ["dashboard", "--host", "0.0.0.0", "--url", str(tmp_path)],
                                env={"QO_DASHBOARD_TOKEN": ""})
    assert result.exit_code == 2
    assert "--host 0.0.0.0 is not a loopback address" in result.output and "--auth-token" in result.output


def test_bad_prices_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(_cli(), ["dashboard", "--prices", "HEAD=1", "--url", str(tmp_path)])
    assert result.exit_code == 2 and "'HEAD' is not one of" in result.output


def test_a_bad_allowed_host_is_a_usage_error(tmp_path):
    for bad in ("http://dash.example", "dash.example:8377", "dash.example/x", "evil example", ""):
        result = CliRunner().invoke(_cli(), ["dashboard", "--allowed-host", bad, "--url", str(tmp_path)])
        assert result.exit_code == 2 and "--allowed-host" in result.output and "is not a host name" in result.output, \
            (bad, result.output)


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """``qo dashboard --port 0`` as a user starts it, and the port it printed."""
    cmd = [str(QO)] if QO.exists() else [sys.executable, "-c", "from qo.cli import main; main()"]
    proc = subprocess.Popen([*cmd, "dashboard", "--url", str(tmp_path / "store"), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            break
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"no address printed: {line!r} {proc.communicate()[1]!r}")
    return proc, int(match.group(1))


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_an_oversized_request_is_one_line_on_stderr(tmp_path):
    """A request line (and a header line) over 8 KiB: 400, and at most one line each on
    the dashboard's stderr, no traceback; the server goes on serving."""
    proc, port = _start(tmp_path)
    try:
        long_line = _raw(port, b"GET /" + b"a" * 9216 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        long_header = _raw(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 9216 + b"\r\n\r\n")
        fine = _raw(port, f"GET /static/favicon.svg HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert re.match(rb"HTTP/1\.[01] 400 ", long_line), long_line[:200]
    assert re.match(rb"HTTP/1\.[01] 400 ", long_header), long_header[:200]
    assert re.match(rb"HTTP/1\.1 200 ", fine), fine[:200]
    assert "Traceback" not in err and "LineTooLong" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and line != "stopped"]
    assert len(lines) <= 2 and all(len(line) < 400 for line in lines), err
    assert all("400" in line for line in lines), err
