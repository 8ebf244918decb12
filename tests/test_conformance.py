"""The storage conformance kit on the built-in backends and on a third-party-style one."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

pytest.register_assert_rewrite("qo.testing.conformance")

import qo  # noqa: E402
from qo.plugins import Plugins  # noqa: E402
from qo.testing import ConformanceTests, StorageFixtures  # noqa: E402


class TestBuiltinBackends(StorageFixtures, ConformanceTests):
    """local and s3 (moto), through conftest's parametrised ``storage_url``."""

    @pytest.fixture
    def storage_url(self, storage_url: str) -> str:
        """Re-point the kit's abstract fixture to conftest's (same name: the outer one)."""
        return storage_url


class TestMemoryBackend(StorageFixtures, ConformanceTests):
    """The qo-memory distribution (plugins/qo-memory), found through its ``qo`` entry
    point as a third-party backend is; its state lives in this process only."""

    multiprocess = False

    @pytest.fixture
    def storage_url(self) -> Iterator[str]:
        qo_memory = pytest.importorskip("qo_memory", reason="plugins/qo-memory is not installed")
        name = f"t-{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}"
        qo_memory.forget(name)


async def test_memory_url_without_the_plugin_is_a_configuration_error() -> None:
    plugins = Plugins(disabled=["memory"])  # as if qo-memory were not installed
    plugins.load_entry_points()
    assert "memory" not in plugins.schemes()
    with pytest.raises(qo.ConfigurationError) as info:
        await qo.connect("memory://x", plugins=plugins)
    message = str(info.value)
    assert "memory://" in message
    assert "installed:" in message and "file://" in message
