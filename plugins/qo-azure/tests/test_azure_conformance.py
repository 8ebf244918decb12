"""The storage conformance kit (qo.testing) on az:// against Azurite, and a whole lifecycle."""

from __future__ import annotations

import pytest

import qo
from qo.testing import ConformanceTests, StorageFixtures

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)


class AzureFixtures(StorageFixtures):
    multiprocess = True  # Azurite is a server: racer processes open the URL themselves

    @pytest.fixture
    def storage_url(self, azure_url: str) -> str:
        return azure_url


class TestAzureConformance(AzureFixtures, ConformanceTests):
    pass


async def test_submitted_tasks_run_to_completion_on_azure(azure_url: str) -> None:
    q = await qo.connect(azure_url, queue="life")  # found through the entry point
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
