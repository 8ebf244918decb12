"""Shared fixtures: every storage-facing test runs on the local backend, on S3 (moto) and
on Azure Blob Storage (Azurite, through plugins/qo-azure)."""

from __future__ import annotations

import os
import uuid

import pytest

import qo

pytest_plugins = ["qo.testing.s3_servers"]  # ceph_rgw, localstack_s3, real_s3_server, real_s3_url

# moto accepts any credentials; subprocesses inherit these.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

BACKENDS = ["local", "s3", "azure"]

#: Shared tests that do not run on azure, and why.
AZURE_SKIPS = {
    # layers above the storage contract: local and s3 run them; azure would add minutes
    # to a suite that must stay under 10 on 2 cores, for no path of its own
    "tests/test_examples.py": "the web examples drive the sync and async API, which is above the storage contract",
    "tests/test_sync_api.py": "the sync API hands coroutines to a loop thread: nothing of it is per backend",
    "tests/test_multi_queue.py": "the slot gate between queues is above the storage contract",
    "tests/test_cli_submit_many.py": "submit-many reads lines and calls submit_many: above the storage contract",
    # multi-process races whose azure-specific part (the CAS) the conformance kit's
    # 8-process races prove on Azurite in plugins/qo-azure; ~55 s of a 2-core suite
    "tests/test_worker_processes.py::test_eight_worker_processes_run_each_task_exactly_once": (
        "the 8-process claim race on az:// is the conformance kit's, in plugins/qo-azure"),
    "tests/test_packs.py::test_four_worker_processes_run_each_task_of_2000_in_packs_exactly_once": (
        "a pack's claim is the CAS the conformance kit races on az:// in plugins/qo-azure; local and s3 run this"),
    "tests/test_ratelimit.py::test_four_workers_hold_a_rate_limit_over_every_sliding_second": (
        "the limiter is CAS on a state object, raced on az:// by the conformance kit; local and s3 run this"),
    "tests/test_aging_bound.py::test_a_marker_moves_at_most_twice_in_its_life": (
        "aging moves markers with the puts and deletes the conformance kit proves on az://; local and s3 run this"),
    "tests/test_conformance.py::TestBuiltinBackends": (
        "the same conformance kit runs on az:// in plugins/qo-azure/tests/test_azure_conformance.py "
        "(against the same Azurite); running it twice would cost ~40 s"),
}


def pytest_collection_modifyitems(config, items):
    """Mark the AZURE_SKIPS tests on the azure backend as skipped, with their reason."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") != "azure":
            continue
        for where, reason in AZURE_SKIPS.items():
            if item.nodeid == where or item.nodeid.startswith((where + "::", where + "[")):
                item.add_marker(pytest.mark.skip(reason=f"not on azure: {reason}"))
                break


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server on a free loopback port for the whole run."""
    from qo.testing.moto import MotoServer

    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite():
    """One Azurite (Azure Storage emulator) per test process, on a free loopback port.

    Its connection string goes to AZURE_STORAGE_CONNECTION_STRING, which the worker and
    racer processes that tests start inherit. Without plugins/qo-azure or without
    Azurite (``python3 dev.py`` installs it with npm), the azure tests skip, saying why.
    """
    testing = pytest.importorskip("qo_azure.testing", reason="plugins/qo-azure is not installed")
    if testing.find_azurite() is None:
        if os.environ.get("CI"):  # CI installs it (dev.py): a skip there would hide a broken install
            pytest.fail(testing.MISSING)
        pytest.skip(testing.MISSING)
    return testing.Azurite.shared()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def storage_url(backend, tmp_path, request):
    """A fresh, empty storage root on the backend under test."""
    if backend == "local":
        yield str(tmp_path / "store")
    elif backend == "sqlite":  # the one-file local store: tests/test_sqlite_store.py asks for it
        yield "sqlite://" + str(tmp_path / "store.db")
    elif backend == "azure":
        azurite = request.getfixturevalue("azurite")
        azurite.restart_if_older()  # before its first garbage collection stalls it (qo_azure.testing)
        url = azurite.new_container(prefix=f"t-{uuid.uuid4().hex[:8]}")
        yield url
        try:  # Azurite holds every container in memory: a suite's worth slowed it to a halt
            azurite.delete_container(url.split("/")[2])
        except Exception:  # best effort: the next test gets a new container anyway
            pass
    else:
        server = request.getfixturevalue("moto_server")
        yield server.new_bucket(prefix=f"t-{uuid.uuid4().hex[:8]}")


FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)


@pytest.fixture
def fast_settings():
    """Worker settings that make tests quick: tight polling, frequent sweeps."""
    from qo.worker import WorkerSettings

    return WorkerSettings(**FAST)


@pytest.fixture
async def queue(storage_url):
    """A queue on the backend under test."""
    import qo

    q = await qo.connect(storage_url, queue="q")
    yield q
    await q.close()


class EventLog:
    """A test plugin recording every qo_task_event."""

    def __init__(self):
        self.events = []

    @qo.hookimpl
    def qo_task_event(self, event, task):
        self.events.append((event, task.id, task.status, task.attempt))

    def of(self, task_id):
        return [e[0] for e in self.events if e[1] == task_id]


@pytest.fixture
def events():
    """Register an event-recording plugin for the test; unregistered in teardown."""
    from qo.plugins import get_plugins

    log = EventLog()
    plugins = get_plugins()
    plugins.register(log, name="test-events")
    yield log
    plugins.unregister("test-events")


@pytest.fixture(autouse=True)
def _restore_logging():
    """A command run in process (CliRunner) sets up logging (qo/cli/logs.py): a handler on
    the root logger writing to that run's stderr, the root's level, the SDK loggers'
    levels. Put them back after each test."""
    import logging

    from qo.cli.logs import SDK_LOGGERS

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sdk = {name: logging.getLogger(name).level for name in SDK_LOGGERS}
    yield
    for h in [h for h in root.handlers if h not in handlers and getattr(h, "_qo_cli", False)]:
        root.removeHandler(h)
    root.setLevel(level)
    for name, lvl in sdk.items():
        logging.getLogger(name).setLevel(lvl)
