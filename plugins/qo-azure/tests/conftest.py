"""Fixtures for qo-azure's own tests (self-contained: qo's tests/conftest.py is not used).

One Azurite per test process (``Azurite.shared()``), found as ``$QO_AZURITE``, the
repo's ``.azurite/`` (``python3 dev.py`` installs it) or ``PATH``; without it every test
that needs a server is skipped with the reason. The server's connection string goes to
``AZURE_STORAGE_CONNECTION_STRING``, which racer and worker processes inherit.
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

pytest.register_assert_rewrite("qo.testing.conformance")

from qo_azure.testing import MISSING, Azurite, find_azurite  # noqa: E402


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """The process's Azurite server (skips the test when Azurite is not installed)."""
    if find_azurite() is None:
        pytest.skip(MISSING)
    yield Azurite.shared()


@pytest.fixture
def azure_url(azurite: Azurite) -> str:
    """A fresh, empty container (under a prefix, so that keys are relative to it)."""
    azurite.restart_if_older()  # before its first garbage collection stalls it (qo_azure.testing)
    return azurite.new_container(prefix=f"t-{uuid.uuid4().hex[:8]}")
