"""The storage conformance kit on the built-in backends and on a third-party-style one."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

pytest.register_assert_rewrite("qo.testing.conformance")

import memory_backend  # noqa: E402  (tests/ is on sys.path: a plugin as a third party writes it)

import qo  # noqa: E402
from qo.plugins import get_plugins  # noqa: E402
from qo.testing import ConformanceTests, StorageFixtures  # noqa: E402


class TestBuiltinBackends(StorageFixtures, ConformanceTests):
    """local and s3 (moto), through conftest's parametrised ``storage_url``."""

    @pytest.fixture
    def storage_url(self, storage_url: str) -> str:
        """Re-point the kit's abstract fixture to conftest's (same name: the outer one)."""
        return storage_url


@pytest.fixture
def memory_plugin() -> Iterator[None]:
    """The memory backend, registered under a name and unregistered in teardown."""
    plugins = get_plugins()
    plugins.register(memory_backend, name="memory-test")
    try:
        yield
    finally:
        plugins.unregister("memory-test")


class TestMemoryBackend(StorageFixtures, ConformanceTests):
    """A backend found through the ``qo_storage`` hook, its state in this process only."""

    multiprocess = False

    @pytest.fixture
    def storage_url(self, memory_plugin: None) -> Iterator[str]:
        name = f"t-{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}"
        memory_backend.forget(name)


async def test_memory_url_without_the_plugin_is_a_configuration_error() -> None:
    plugins = get_plugins()
    if "memory" in plugins.schemes():
        pytest.skip("a memory:// backend is installed in this environment")
    with pytest.raises(qo.ConfigurationError) as info:
        await qo.connect("memory://x")
    message = str(info.value)
    assert "memory://" in message
    assert "installed:" in message and "file://" in message
