"""Shared fixtures: every storage-facing test runs on the local backend and on S3 (moto)."""

from __future__ import annotations

import os
import uuid

import pytest

# moto accepts any credentials; subprocesses inherit these.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

BACKENDS = ["local", "s3"]


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server on a free loopback port for the whole run."""
    from qo.testing.moto import MotoServer

    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def storage_url(backend, tmp_path, request) -> str:
    """A fresh, empty storage root on the backend under test."""
    if backend == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("moto_server")
    return server.url(prefix=f"t-{uuid.uuid4().hex[:12]}")
