"""A one-host Ceph cluster with a RADOS Gateway on loopback, for tests: a real S3 server.

``CephRGW().start()`` builds what Ceph's ``vstart.sh`` builds, minus everything S3 does
not need, in a temporary directory: one monitor, one OSD on ``memstore`` (objects in
memory, nothing on disk but the keyrings and logs), cephx on, no manager, and
``radosgw`` on the ``beast`` frontend at ``127.0.0.1:PORT``; then an S3 user made with
``radosgw-admin``. It starts in about 30 s and ``stop()`` removes every process and file.

The binaries are Debian's (``apt-get install radosgw ceph-mon ceph-osd ceph-common``;
``python3 dev.py`` installs them as root): :func:`find_ceph` says why they cannot be
used (``None`` when they can). Tested with Ceph 16.2 (Debian 12).

``CephRGW.shared()`` is one cluster per process, stopped at exit. Its S3 user has
moto's test keys (``testing``/``testing``), so the environment that serves moto (and
the worker processes a test starts) serves it too; :attr:`CephRGW.options` has them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from .processes import create_bucket, free_port, start_daemon, stop_process

__all__ = ["CephRGW", "find_ceph", "BINARIES"]

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")
#: the S3 user's keys, moto's well-known test ones: one set of credentials in the
#: environment (``AWS_ACCESS_KEY_ID=testing``...) then serves moto, LocalStack and Ceph
ACCESS_KEY = SECRET_KEY = "testing"


def find_ceph() -> str | None:
    """``None`` when the Ceph binaries are on ``PATH``, else what is missing and how to get it."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return None
    return (f"Ceph not found ({', '.join(missing)} missing): run `python3 dev.py test` as root, or "
            "`apt-get install radosgw ceph-mon ceph-osd ceph-common`")


_CONF = """\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
ms bind msgr2 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {dir}/keyring
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
mon data = {dir}/mon.$id
osd data = {dir}/osd.$id
osd objectstore = memstore
memstore device bytes = 1073741824
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd op num shards = 1
osd op num threads per shard = 2
debug ms = 0
[osd]
keyring = {dir}/osd.$id/keyring
[client.rgw.qo]
keyring = {dir}/rgw.keyring

rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw thread pool size = 32
rgw dns name = localhost
rgw enable usage log = false
rgw crypt require ssl = false
"""


class CephRGW:
    """A throwaway Ceph cluster (mon, memstore OSD, radosgw) on ``127.0.0.1``."""

    _shared: CephRGW | None = None

    @classmethod
    def shared(cls) -> CephRGW:
        """This process's cluster, started on first use and stopped at exit."""
        if cls._shared is None:
            server = cls()
            atexit.register(server.stop)
            server.start()
            cls._shared = server
        return cls._shared

    def __init__(self, bucket: str = "qo-test"):
        self.bucket = bucket
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self._dir: Path | None = None
        self._procs: list[subprocess.Popen] = []
        self._rgw_port: int | None = None
        self.startup_seconds: float | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running gateway."""
        if self._rgw_port is None:
            raise RuntimeError("CephRGW is not started")
        return f"http://127.0.0.1:{self._rgw_port}"

    @property
    def options(self) -> dict[str, str]:
        """The storage options (credentials) a qo URL of this cluster needs."""
        return {"key": self.access_key, "secret": self.secret_key}

    def url(self, prefix: str = "", *, bucket: str | None = None) -> str:
        """A qo storage URL for ``prefix`` in this gateway's bucket (or ``bucket``)."""
        endpoint = quote(self.endpoint_url, safe="")
        return f"s3://{bucket or self.bucket}/{prefix}?endpoint_url={endpoint}&region=us-east-1"

    def new_bucket(self, prefix: str = "") -> str:
        """Create a fresh, uniquely named bucket and return its URL."""
        name = f"qo-{uuid.uuid4().hex[:20]}"
        self._create_bucket(name)
        return self.url(prefix, bucket=name)

    # -- start and stop ------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Build the cluster in a temporary directory and wait until S3 answers."""
        reason = find_ceph()
        if reason is not None:
            raise RuntimeError(reason)
        started = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix="qo-ceph-"))
        try:
            self._start(timeout)
        except BaseException:
            logs = self._logs()
            self.stop()
            raise RuntimeError(f"Ceph did not start: {logs}") from None
        self.startup_seconds = time.monotonic() - started

    def _start(self, timeout: float) -> None:
        d = self._dir
        assert d is not None
        deadline = time.monotonic() + timeout
        for sub in ("run", "log", "mon.a", "osd.0"):
            (d / sub).mkdir()
        mon_port, self._rgw_port = free_port(), free_port()
        fsid = str(uuid.uuid4())
        conf = d / "ceph.conf"
        conf.write_text(_CONF.format(fsid=fsid, mon_port=mon_port, rgw_port=self._rgw_port, dir=d))
        c = ["-c", str(conf)]
        keyring = str(d / "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
                  "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v1:127.0.0.1:{mon_port}]",
                  str(d / "monmap"))
        self._run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"), "--keyring", keyring)
        self._daemon("ceph-mon", *c, "-f", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_key = self._run("ceph-authtool", "--gen-print-key").strip()
        (d / "osd.json").write_text(f'{{"cephx_secret": "{osd_key}"}}')
        osd_id = self._ceph(c, deadline, "osd", "new", osd_uuid, "-i", str(d / "osd.json")).strip()
        self._run("ceph-authtool", "--create-keyring", str(d / f"osd.{osd_id}" / "keyring"), "-n", f"osd.{osd_id}",
                  "--add-key", osd_key)
        self._run("ceph-osd", *c, "-i", osd_id, "--mkfs", "--key", osd_key, "--osd-uuid", osd_uuid)
        self._daemon("ceph-osd", *c, "-f", "-i", osd_id)
        rgw_keyring = str(d / "rgw.keyring")
        self._ceph(c, deadline, "auth", "get-or-create", "client.rgw.qo", "mon", "allow rw", "osd", "allow rwx",
                   "-o", rgw_keyring)
        self._daemon("radosgw", *c, "-f", "-n", "client.rgw.qo")
        self._wait_for_s3(deadline)
        self._run("radosgw-admin", *c, "user", "create", "--uid", "qo", "--display-name", "qo",
                  "--access-key", self.access_key, "--secret-key", self.secret_key, timeout=max(5.0, deadline - time.monotonic()))
        self._create_bucket(self.bucket)

    def _run(self, *cmd: str, timeout: float = 60.0) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self._dir)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:3])} failed (exit {done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-400:]}")
        return done.stdout

    def _ceph(self, c: list[str], deadline: float, *args: str) -> str:
        """A ``ceph`` command, with a per-try timeout (the mon may still be starting)."""
        return self._run("ceph", *c, "--connect-timeout", str(max(5, int(deadline - time.monotonic()))), *args,
                         timeout=max(5.0, deadline - time.monotonic()))

    def _daemon(self, *cmd: str) -> None:
        log = open(self._dir / "log" / f"{cmd[0]}.out", "wb")  # type: ignore[operator]
        try:
            self._procs.append(start_daemon(list(cmd), log, cwd=str(self._dir)))
        finally:
            log.close()

    def _wait_for_s3(self, deadline: float) -> None:
        """Until the gateway answers HTTP (it listens only once its pools exist)."""
        import urllib.error
        import urllib.request

        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # an S3 error answer (403): it is serving
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("radosgw did not answer in time")

    def _logs(self) -> str:
        if self._dir is None:
            return "no logs"
        out = []
        for f in sorted((self._dir / "log").glob("*")):
            try:
                text = f.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                out.append(f"{f.name}: {text[-300:]}")
        return " | ".join(out)[-1500:] or "no logs"

    def _create_bucket(self, name: str) -> None:
        create_bucket(self.endpoint_url, name, self.access_key, self.secret_key)

    def stop(self) -> None:
        """Stop every daemon (gateway first) and remove the directory."""
        procs, self._procs = self._procs, []
        for proc in reversed(procs):
            stop_process(proc, timeout=10.0)
        d, self._dir = self._dir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        self._rgw_port = None

    def __enter__(self) -> CephRGW:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._rgw_port is not None else "not started"
        return f"CephRGW({self.bucket!r}, {where})"
