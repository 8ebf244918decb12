"""pytest fixtures for real S3 servers a test run starts itself: Ceph RGW and LocalStack.

Load it as a plugin (``pytest_plugins = ["qo.testing.s3_servers"]`` in a conftest).
Session fixtures, each one server per test process, started on first use:

- ``ceph_rgw``: a :class:`qo.testing.ceph.CephRGW` (about 15-30 s to start);
- ``localstack_s3``: a :class:`qo.testing.localstack.LocalStack` (about 3-6 s);
- ``real_s3_server``: parametrised over both (``ceph``, ``localstack``);
- ``real_s3_url``: a fresh bucket's ``s3://`` URL on ``real_s3_server``; the servers
  accept moto's ``testing`` keys, which the test environment (and the processes a test
  starts) already has, and ``server.options`` has them for ``open_storage``.

Where a server is not installed (``python3 dev.py test`` installs both when it can),
the tests that ask for it skip, saying why; with ``CI`` set they fail instead, so a
broken install cannot hide. With pytest-xdist run ``--dist loadgroup`` (dev.py does):
``real_s3_server``'s params carry ``xdist_group("ceph")`` / ``("localstack")``, so
one process, not each, starts each server; mark a test that asks for ``ceph_rgw`` or
``localstack_s3`` directly the same way.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

__all__ = ["ceph_rgw", "localstack_s3", "real_s3_server", "real_s3_url", "REAL_S3"]

REAL_S3 = ["ceph", "localstack"]  #: the params of ``real_s3_server``


def _missing(reason: str) -> None:
    """Skip (or, under CI, fail) a test whose server is not installed."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the server must be installed; python3 dev.py installs it)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ceph_rgw() -> Iterator[Any]:
    """One Ceph cluster (mon, memstore OSD, radosgw) per test process."""
    from qo.testing.ceph import CephRGW, find_ceph

    reason = find_ceph()
    if reason is not None:
        _missing(reason)
    yield CephRGW.shared()


@pytest.fixture(scope="session")
def localstack_s3() -> Iterator[Any]:
    """One LocalStack (S3 only, host mode) per test process."""
    from qo.testing.localstack import MISSING, LocalStack, find_localstack

    if find_localstack() is None:
        _missing(MISSING)
    yield LocalStack.shared()


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in REAL_S3])
def real_s3_server(request: pytest.FixtureRequest) -> Any:
    """The server under test: Ceph RGW or LocalStack."""
    return request.getfixturevalue("ceph_rgw" if request.param == "ceph" else "localstack_s3")


@pytest.fixture
def real_s3_url(real_s3_server: Any) -> str:
    """A fresh bucket on the real server under test, as an ``s3://`` URL with a prefix."""
    import uuid

    return real_s3_server.new_bucket(prefix=f"t-{uuid.uuid4().hex[:8]}")
