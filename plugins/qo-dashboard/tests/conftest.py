"""Fixtures for qo-dashboard's own tests (self-contained: qo's tests/conftest.py is not used).

Every view test runs on the local backend and on S3 (a moto server on loopback). The
queue under test counts its requests (``CountingStorage``), as ``qo dashboard`` does.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

import qo
from qo.counting import CountingStorage

# moto accepts any credentials
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from qo_dashboard import create_app  # noqa: E402

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server on a free loopback port for the whole run."""
    from qo.testing.moto import MotoServer

    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def storage_url(backend, tmp_path, request) -> str:
    """A fresh, empty storage root on the backend under test."""
    if backend == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("moto_server").new_bucket(prefix=f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def queue(storage_url) -> AsyncIterator[Any]:
    """A queue on the backend under test whose requests are counted."""
    q = await qo.connect(storage_url, queue="q", wrap_storage=CountingStorage)
    yield q
    await q.close()


@pytest.fixture
async def make_client(queue) -> AsyncIterator[Callable[..., Any]]:
    """``await make_client(**create_app options)``: an aiohttp test client of the dashboard."""
    clients: list[TestClient] = []

    async def make(**options: Any) -> TestClient:
        client = TestClient(TestServer(create_app(queue, **options)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client):
    """A dashboard client with actions allowed and no auth token."""
    return await make_client(allow_actions=True)
