"""Azurite (Microsoft's Azure Storage emulator) on a free loopback port, for tests and trials.

``Azurite`` starts ``azurite-blob`` in a subprocess with its data in memory, and hands
out fresh containers as ``az://`` URLs (``new_container``). The backend finds the
server through a connection string: ``connection_string`` holds it, and
``export_env()`` puts it in ``AZURE_STORAGE_CONNECTION_STRING`` so that processes
started afterwards (workers, racers) inherit it.

The binary is found as ``$QO_AZURITE`` (a path), else
``<repo>/.azurite/node_modules/.bin/azurite-blob`` (``python3 dev.py`` installs it
there with npm), else ``azurite-blob`` on ``PATH``. :func:`find_azurite` returns
``None`` when there is none; :data:`MISSING` says how to get it.

``Azurite.shared()`` is one server per process, stopped at exit: test suites whose
fixtures live in different conftest files then agree on the one connection string in
the environment. The server dies with the process that started it (Linux).

Azurite frees the data of deleted blobs in one garbage collection 10 minutes after it
starts (then every 10 minutes). After a test suite's worth of writes that pass stalls
every request for over a minute, so a long-lived test server is restarted between
tests before it gets there: ``restart_if_older(seconds)``.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from qo.testing.processes import stop_process

from .settings import DEVSTORE_KEY

__all__ = ["Azurite", "find_azurite", "MISSING", "ACCOUNT"]

ACCOUNT = "devstoreaccount1"  #: Azurite's well-known development account
MISSING = (
    "Azurite not found: run `python3 dev.py test` (it installs it with npm into .azurite/), "
    "or `npm install --prefix .azurite azurite`, or set QO_AZURITE to the azurite-blob binary"
)
_REPO = Path(__file__).resolve().parents[3]  # plugins/qo-azure/qo_azure/testing.py -> the repo


def find_azurite() -> str | None:
    """The azurite-blob executable: ``$QO_AZURITE``, the repo's ``.azurite/``, or ``PATH``."""
    explicit = os.environ.get("QO_AZURITE")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    local = _REPO / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("azurite-blob")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel send SIGTERM to the server when the test process dies."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    """An ``azurite-blob`` process on ``127.0.0.1`` (free port), data in memory."""

    _shared: Azurite | None = None

    @classmethod
    def shared(cls) -> Azurite:
        """This process's server, started on first use (and exported to the environment)."""
        if cls._shared is None:
            server = cls()
            server.start()
            atexit.register(server.stop)
            cls._shared = server
        cls._shared.export_env()
        return cls._shared

    def __init__(self, binary: str | None = None):
        self.binary = binary or find_azurite()
        self._proc: subprocess.Popen | None = None
        self._log: Any = None  # an unlinked temp file: the server's output, gone with the process
        self._port: int | None = None
        self._started_at = 0.0

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT/devstoreaccount1``: the blob service of the dev account."""
        if self._port is None:
            raise RuntimeError("Azurite is not started")
        return f"http://127.0.0.1:{self._port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        """The connection string of the running server (the published dev key: not a secret)."""
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={DEVSTORE_KEY};"
                f"BlobEndpoint={self.endpoint_url};")

    def export_env(self) -> None:
        """Set ``AZURE_STORAGE_CONNECTION_STRING`` for this process and those it starts."""
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = self.connection_string

    def start(self, timeout: float = 60.0) -> None:
        """Start the server on a free loopback port and wait until it answers."""
        if not self.binary:
            raise RuntimeError(MISSING)
        for _attempt in range(3):  # a free port can be taken between choosing and binding it
            self._port = _free_port()
            self._close_log()
            self._log = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self._port),
                 "--inMemoryPersistence", "--silent",  # no --location: nothing on disk
                 "--skipApiVersionCheck",  # the SDK may speak a newer API version than Azurite
                 # idle connections live longer than aiohttp keeps them (15 s): with
                 # Azurite's 5 s, a request could go out on a socket being closed
                 "--blobKeepAliveTimeout", "60",
                 "--disableTelemetry"],
                stdout=self._log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if os.name == "posix" else None,
            )
            if self._wait_ready(timeout):
                self._started_at = time.monotonic()
                return
            self._kill()
        output = self._stderr()
        self.stop()
        raise RuntimeError(f"Azurite did not start: {output}")

    def restart_if_older(self, seconds: float = 420.0) -> None:
        """Restart the server (new port, new connection string exported, no data) when it
        has run longer than ``seconds``, so that it never reaches its first garbage
        collection (see the module's doc). Call it between tests only: it drops every
        container."""
        if self._proc is not None and time.monotonic() - self._started_at > seconds:
            self.stop()
            self.start()
            self.export_env()

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self._port or 0), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _stderr(self) -> str:
        if self._log is None:
            return "no output"
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-500:] or "no output"

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def url(self, container: str, prefix: str = "") -> str:
        """An ``az://`` URL for ``prefix`` in ``container`` of this server."""
        return f"az://{container}/{prefix}" if prefix else f"az://{container}"

    def create_container(self, name: str) -> None:
        """Create ``name`` (an existing one is fine)."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string, retry_total=2) as client:
            try:
                client.create_container(name)
            except ResourceExistsError:
                pass

    def new_container(self, prefix: str = "") -> str:
        """Create a fresh, uniquely named container and return its ``az://`` URL."""
        name = f"qo-{uuid.uuid4().hex[:20]}"
        self.create_container(name)
        return self.url(name, prefix)

    def delete_container(self, name: str) -> None:
        """Delete ``name`` and its blobs (a missing one is fine): Azurite keeps everything
        in memory, and a suite that leaves every test's container behind slows it down."""
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string, retry_total=2) as client:
            try:
                client.delete_container(name)
            except ResourceNotFoundError:
                pass

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)

    def stop(self) -> None:
        """Stop the server (its data was in memory: nothing is left behind)."""
        self._kill()
        self._port = None
        self._close_log()

    def __enter__(self) -> Azurite:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._port is not None else "not started"
        return f"Azurite({where})"
