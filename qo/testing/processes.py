"""Starting and stopping the server processes a test or benchmark runs."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from typing import IO, Any


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; None is a no-op."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int) -> Any:
    def preexec() -> None:  # pragma: no cover - runs in the child before exec
        """Linux: have the kernel send ``sig`` to the server when the test process dies."""
        try:
            ctypes.CDLL(None).prctl(1, sig)  # PR_SET_PDEATHSIG
        except Exception:
            pass

    return preexec


def start_daemon(cmd: list[str], log: IO[bytes], *, death_signal: int = signal.SIGTERM,
                 **kwargs: Any) -> subprocess.Popen:
    """Start a server in the foreground of a child process that gets ``death_signal``
    when this one dies (SIGKILL for a server that may not exit on SIGTERM), its output
    to ``log``."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent(death_signal) if os.name == "posix" else None, **kwargs)


def create_bucket(endpoint_url: str, name: str, access_key: str, secret_key: str) -> None:
    """Create bucket ``name`` on the S3 server at ``endpoint_url`` (one that exists is fine)."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                          aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    try:
        client.create_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    finally:
        client.close()
