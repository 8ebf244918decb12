"""qo-memory: the storage conformance kit, and a whole task lifecycle on memory://.

Self-contained (no qo tests/conftest.py): the plugin is found through its ``qo`` entry
point, as ``pip install qo-memory`` makes it.
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

pytest.register_assert_rewrite("qo.testing.conformance")

import qo  # noqa: E402
import qo_memory  # noqa: E402
from qo.testing import ConformanceTests, StorageFixtures  # noqa: E402

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh store for each test, forgotten in teardown."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    qo_memory.forget(name)


class MemoryFixtures(StorageFixtures):
    multiprocess = False  # the data lives in this process: racers are threads

    @pytest.fixture
    def storage_url(self, memory_url: str) -> str:
        return memory_url


class TestMemoryConformance(MemoryFixtures, ConformanceTests):
    pass


async def test_submitted_tasks_run_to_completion_on_memory(memory_url: str) -> None:
    q = await qo.connect(memory_url, queue="life")  # found through the entry point
    try:
        tasks = [await q.submit("double", {"n": n}) for n in range(20)]
        worker = qo.Worker(q, concurrency=4, **FAST)

        @worker.handler("double")
        async def double(input, ctx):
            return input["n"] * 2

        stats = await worker.run(until_idle=True)
        assert stats["completed"] == 20
        for n, task in enumerate(tasks):
            done = await q.get(task.id)
            assert (done.status, done.output) == ("completed", n * 2)
    finally:
        await q.close()


async def test_the_same_url_sees_the_same_data_and_another_name_does_not(memory_url: str) -> None:
    a, b = await qo.connect(memory_url, queue="q"), await qo.connect(memory_url, queue="q")
    other = await qo.connect(memory_url + "-other", queue="q")
    try:
        task = await a.submit("t", None)
        assert (await b.get(task.id)).id == task.id
        with pytest.raises(qo.TaskNotFound):
            await other.get(task.id)
    finally:
        for q in (a, b, other):
            await q.close()
        qo_memory.forget(memory_url.removeprefix("memory://") + "-other")


async def test_listed_entries_carry_modified_times(memory_url: str) -> None:
    storage = qo_memory.MemoryStorage(memory_url)
    await storage.put("k", b"v")
    [entry] = await storage.list("")
    assert entry.modified is not None and entry.modified > 0


def test_a_memory_url_without_a_name_is_a_configuration_error() -> None:
    for url in ("memory://", "memory://name/with/path"):
        with pytest.raises(qo.ConfigurationError):
            qo_memory.MemoryStorage(url)


def test_the_plugin_is_loaded_from_its_entry_point() -> None:
    from qo.plugins import Plugins

    plugins = Plugins()
    plugins.load_entry_points()
    info = plugins.info["memory"]
    assert (info.status, info.distribution) == ("loaded", "qo-memory")
    assert "memory" in plugins.schemes()
