"""s3rver (npm) on a free loopback port: an S3 server with no conditional writes at all.

qo must refuse such a store, not run on it: tests use it to prove the refusal on a
server nobody here wrote. The binary is ``$QO_S3RVER``, else
``<repo>/.s3rver/node_modules/.bin/s3rver`` (``python3 dev.py`` installs it with npm),
else ``s3rver`` on ``PATH``; :func:`find_s3rver` returns ``None`` when there is none.
Its data lives in a temporary directory removed at ``stop()``; it accepts the keys
``S3RVER``/``S3RVER`` (:attr:`S3rver.options`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from .processes import free_port, start_daemon, stop_process

__all__ = ["S3rver", "find_s3rver", "MISSING", "VERSION"]

VERSION = "3.7.1"  #: what dev.py installs
MISSING = ("s3rver not found: run `python3 dev.py test` (it installs it with npm into .s3rver/), "
           "or set QO_S3RVER to the s3rver binary")
_REPO = Path(__file__).resolve().parents[2]


def find_s3rver() -> str | None:
    """The s3rver executable, or None."""
    explicit = os.environ.get("QO_S3RVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    local = _REPO / ".s3rver" / "node_modules" / ".bin" / "s3rver"
    return str(local) if os.access(local, os.X_OK) else shutil.which("s3rver")


class S3rver:
    """An s3rver process on ``127.0.0.1`` with one bucket configured at start."""

    def __init__(self, bucket: str = "qo-test", binary: str | None = None):
        self.bucket = bucket
        self.binary = binary or find_s3rver()
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None
        self._port: int | None = None

    @property
    def endpoint_url(self) -> str:
        if self._port is None:
            raise RuntimeError("S3rver is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def options(self) -> dict[str, str]:
        """s3rver's fixed credentials, as storage options."""
        return {"key": "S3RVER", "secret": "S3RVER"}

    def url(self, prefix: str = "") -> str:
        endpoint = quote(self.endpoint_url, safe="")
        return f"s3://{self.bucket}/{prefix}?endpoint_url={endpoint}&region=us-east-1"

    def start(self, timeout: float = 30.0) -> None:
        """Start serving and wait until the port accepts connections."""
        if not self.binary:
            raise RuntimeError(MISSING)
        self._dir = Path(tempfile.mkdtemp(prefix="qo-s3rver-"))
        self._port = free_port()
        with open(self._dir / "s3rver.log", "wb") as log:
            self._proc = start_daemon([self.binary, "-d", str(self._dir / "data"), "-a", "127.0.0.1",
                                       "-p", str(self._port), "--configure-bucket", self.bucket, "--silent"], log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self._port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        output = (self._dir / "s3rver.log").read_text(errors="replace")[-500:]
        self.stop()
        raise RuntimeError(f"s3rver did not start: {output or 'no output'}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
        d, self._dir = self._dir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        self._port = None

    def __enter__(self) -> S3rver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
