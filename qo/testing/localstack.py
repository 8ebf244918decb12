"""LocalStack's S3 on a free loopback port, in host mode (no Docker), for tests.

LocalStack 4.x needs Python >= 3.13, so it lives in a virtualenv of its own:
``<repo>/.localstack-venv`` (``python3 dev.py`` makes it with ``python3.13`` and
installs :data:`PACKAGES` into it with pip: ``localstack-core[runtime]`` 4.14.0 and the
pins its dependencies need),
or the interpreter named by ``$QO_LOCALSTACK_PYTHON``. :func:`find_localstack` returns
that interpreter, or ``None``; :data:`MISSING` says how to get it.

The runtime is started directly (``python -m localstack.runtime.main``) with only S3
(``SERVICES=s3``), on the hypercorn gateway at ``127.0.0.1:PORT``, without its DNS
server and with its state in a temporary directory removed at ``stop()``. It answers in
about 3 s. Any credentials are accepted (moto's ``testing`` ones in the environment do).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from .processes import create_bucket, free_port, start_daemon, stop_process

__all__ = ["LocalStack", "find_localstack", "MISSING", "PACKAGES", "VENV"]

VENV = Path(__file__).resolve().parents[2] / ".localstack-venv"  #: qo/testing/localstack.py -> the repo
#: what dev.py installs into VENV (LocalStack 4.14 with the pins its dependencies need)
PACKAGES = ("localstack-core[runtime]==4.14.0", "cbor2<6", "pyopenssl<24.3", "cryptography<44")
MISSING = ("LocalStack not found: run `python3 dev.py test` (it makes .localstack-venv/ with python3.13), "
           "or set QO_LOCALSTACK_PYTHON to a Python >= 3.13 that has localstack-core[runtime]")


def find_localstack() -> str | None:
    """The Python that runs LocalStack: ``$QO_LOCALSTACK_PYTHON`` or the repo's venv; else None."""
    python = os.environ.get("QO_LOCALSTACK_PYTHON") or str(VENV / "bin" / "python")
    if not os.access(python, os.X_OK):
        return None
    if not any((Path(python).parent.parent / "lib").glob("python3.*/site-packages/localstack/runtime/main.py")):
        return None
    return python


class LocalStack:
    """A LocalStack process serving S3 on ``127.0.0.1`` (free port)."""

    _shared: LocalStack | None = None

    @classmethod
    def shared(cls) -> LocalStack:
        """This process's server, started on first use and stopped at exit."""
        if cls._shared is None:
            server = cls()
            atexit.register(server.stop)
            server.start()
            cls._shared = server
        return cls._shared

    def __init__(self, bucket: str = "qo-test", python: str | None = None):
        self.bucket = bucket
        self.python = python or find_localstack()
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None
        self._port: int | None = None
        self.startup_seconds: float | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self._port is None:
            raise RuntimeError("LocalStack is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def options(self) -> dict[str, str]:
        """The storage options a qo URL of this server needs (it accepts any keys)."""
        return {"key": "test", "secret": "test"}

    def url(self, prefix: str = "", *, bucket: str | None = None) -> str:
        """A qo storage URL for ``prefix`` in this server's bucket (or ``bucket``)."""
        endpoint = quote(self.endpoint_url, safe="")
        return f"s3://{bucket or self.bucket}/{prefix}?endpoint_url={endpoint}&region=us-east-1"

    def new_bucket(self, prefix: str = "") -> str:
        """Create a fresh, uniquely named bucket and return its URL."""
        name = f"qo-{uuid.uuid4().hex[:20]}"
        self._create_bucket(name)
        return self.url(prefix, bucket=name)

    def start(self, timeout: float = 90.0) -> None:
        """Start LocalStack's runtime with S3 only and wait until S3 is available."""
        if not self.python:
            raise RuntimeError(MISSING)
        started = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix="qo-localstack-"))
        self._port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update({
            "SERVICES": "s3", "EAGER_SERVICE_LOADING": "1",
            "GATEWAY_LISTEN": f"127.0.0.1:{self._port}", "GATEWAY_SERVER": "hypercorn",
            "DNS_ADDRESS": "0",  # no DNS server (it would look for an upstream one first)
            "LOCALSTACK_VOLUME_DIR": str(self._dir / "volume"), "TMPDIR": str(self._dir),
            "PERSISTENCE": "0", "DISABLE_EVENTS": "1", "SKIP_SSL_CERT_DOWNLOAD": "1",
            "LOCALSTACK_TELEMETRY": "0",
        })
        with open(self._dir / "localstack.log", "wb") as log:
            # SIGKILL if the test process dies: LocalStack's runtime was seen to outlive a SIGTERM
            self._proc = start_daemon([self.python, "-m", "localstack.runtime.main"], log, env=env,
                                      cwd=str(self._dir), death_signal=signal.SIGKILL)
        try:
            self._wait_ready(time.monotonic() + timeout)
            self._create_bucket(self.bucket)
        except BaseException:
            output = self._output()
            self.stop()
            raise RuntimeError(f"LocalStack did not start: {output}") from None
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        import json
        import urllib.request

        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError("LocalStack exited")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/_localstack/health", timeout=2) as resp:
                    if json.load(resp).get("services", {}).get("s3") in ("available", "running"):
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("LocalStack did not answer in time")

    def _output(self) -> str:
        try:
            return (self._dir / "localstack.log").read_text(errors="replace")[-800:]  # type: ignore[operator]
        except (OSError, TypeError):
            return "no output"

    def _create_bucket(self, name: str) -> None:
        create_bucket(self.endpoint_url, name, "test", "test")

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        proc, self._proc = self._proc, None
        stop_process(proc, timeout=10.0)
        d, self._dir = self._dir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        self._port = None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._port is not None else "not started"
        return f"LocalStack({self.bucket!r}, {where})"
