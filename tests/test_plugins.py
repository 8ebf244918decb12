"""The plugin manager: entry points, blocking, broken plugins, direct registration, docs."""

from __future__ import annotations

import inspect
import types

import pytest

import qo
from qo import hookspecs
from qo.doctor import run_checks
from qo.plugins import ESSENTIAL, Plugins, disabled_from_env
from qo.testing.moto import MotoServer


def test_builtins_load_through_the_entry_point_group():
    plugins = Plugins()
    plugins.load_entry_points()
    info = plugins.info
    assert {"local", "s3", "retry"} <= set(info)
    assert info["local"].status == "loaded" and info["local"].distribution == "qo"
    assert "qo_storage" in info["local"].hooks
    assert {"", "file", "s3"} <= set(plugins.schemes())  # third-party backends may add more


def test_a_plugin_can_be_blocked_by_name_but_not_an_essential_one(monkeypatch):
    monkeypatch.setenv("QO_DISABLE_PLUGINS", "s3, retry")
    plugins = Plugins(disabled=disabled_from_env())
    plugins.load_entry_points()
    assert plugins.info["s3"].status == "blocked"
    assert "retry" in ESSENTIAL and plugins.info["retry"].status == "loaded"
    assert "s3" not in plugins.schemes()
    with pytest.raises(qo.ConfigurationError) as err:
        from qo.backends import open_storage

        open_storage("s3://bucket/x", plugins=plugins)
    assert "s3://" in str(err.value) and "pip install 'qo[s3]'" in str(err.value)


def test_a_misspelt_hook_is_reported_not_fatal():
    plugins = Plugins()
    bad = types.SimpleNamespace()

    @qo.hookimpl
    def qo_storag(url, options):  # typo
        return None

    bad.qo_storag = qo_storag
    with pytest.raises(qo.PluginError) as err:
        plugins.register(bad, name="typo")
    assert "typo" in str(err.value) and "qo_storag" in str(err.value)
    assert plugins.info["typo"].status == "broken"
    assert plugins.pm.get_plugin("typo") is None


def test_a_hook_with_a_wrong_signature_is_reported():
    plugins = Plugins()
    bad = types.SimpleNamespace()

    @qo.hookimpl
    def qo_storage(url, options, surprise):
        return None

    bad.qo_storage = qo_storage
    with pytest.raises(qo.PluginError):
        plugins.register(bad, name="wrongsig")
    assert plugins.info["wrongsig"].status == "broken"
    assert "surprise" in plugins.info["wrongsig"].error


def test_a_plugin_whose_import_fails_is_reported(monkeypatch):
    class FakeEP:
        name, value, group, dist = "exploding", "nowhere.plugin", "qo", None

        def load(self):
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [FakeEP()])
    plugins = Plugins()
    plugins.load_entry_points()
    assert plugins.info["exploding"].status == "broken"
    assert "No module named" in plugins.info["exploding"].error


def test_a_later_plugin_overrides_a_builtin_default():
    plugins = Plugins()
    plugins.load_entry_points()
    task = qo.Task(id="0" * 24, task_type="t", attempt=1, max_retries=3)
    assert 0 < plugins.hook.qo_retry_delay(task=task, error=RuntimeError()) <= 1.0

    class Fixed:
        @qo.hookimpl
        def qo_retry_delay(self, task, error):
            return 42.0

    plugins.register(Fixed(), name="fixed")
    assert plugins.hook.qo_retry_delay(task=task, error=RuntimeError()) == 42.0
    plugins.unregister("fixed")
    assert plugins.hook.qo_retry_delay(task=task, error=RuntimeError()) != 42.0


def test_default_retry_backoff_grows_and_stops_after_max_retries():
    from qo.policies.retry import qo_retry_delay

    def delay(attempt, error=RuntimeError()):
        return qo_retry_delay(qo.Task(id="0" * 24, task_type="t", attempt=attempt, max_retries=5), error)

    for attempt in range(1, 6):
        assert 2 ** (attempt - 1) / 2 <= delay(attempt) <= 2 ** (attempt - 1)
    assert delay(6) == -1  # attempts used up
    assert delay(1, qo.Fail("no")) == -1
    assert delay(1, qo.Retry(delay=7)) == 7


def test_every_hook_is_documented():
    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("qo_")]
    assert len(specs) >= 9
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert len(doc.splitlines()) >= 3, f"{spec.__name__} needs a docstring"
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, f"{spec.__name__} does not document {param}"


def test_plugins_cli_lists_hooks_and_schemes():
    from click.testing import CliRunner

    from qo.cli import cli

    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "local" in result.output and "qo_storage" in result.output and "s3://" in result.output


async def test_doctor_passes_on_a_store_with_conditional_writes(storage_url):
    from qo.backends import open_storage

    storage = open_storage(storage_url)
    checks = {c.name: c for c in await run_checks(storage)}
    await storage.close()
    assert checks["create-only"].ok and checks["compare-and-swap"].ok and checks["list"].ok
    assert checks["conditional delete"].ok


class BatchWrapper:
    """A storage whose ``delete_many`` does nothing (``mode="noop"``) or raises
    (``mode="raise"``); every other call goes to ``inner``."""

    def __init__(self, inner, mode: str):
        self.inner, self.mode, self.batches = inner, mode, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def delete_many(self, keys):
        self.batches += 1
        if self.mode == "raise":
            raise qo.StorageError("batch refused by the test", backend="wrapper")


async def scratch_left(storage) -> list[str]:
    return [e.key for e in await storage.list("_doctor/")]


async def test_doctor_proves_batch_delete_by_doing_one(storage_url):
    from qo.backends import open_storage

    storage = open_storage(storage_url)
    try:
        checks = {c.name: c for c in await run_checks(storage)}
        batch = checks["capability: batch delete"]
        assert batch.ok and batch.detail.startswith("yes (proven: 3 objects deleted in one call"), batch.detail
        assert "cleanup" not in checks
        assert await scratch_left(storage) == []
    finally:
        await storage.close()


@pytest.mark.parametrize("mode, says", [
    ("noop", "no: delete_many returned, but 3 of 3 objects are still there"),
    ("raise", "no: delete_many failed (StorageError: batch refused by the test"),
])
async def test_doctor_reports_a_batch_delete_that_does_not_work_and_cleans_up(storage_url, mode, says):
    from qo.backends import open_storage

    inner = open_storage(storage_url)
    storage = BatchWrapper(inner, mode)
    try:
        checks = {c.name: c for c in await run_checks(storage)}
        batch = checks["capability: batch delete"]
        assert not batch.ok and not batch.required
        assert batch.detail.startswith(says) and "one by one" in batch.detail, batch.detail
        assert all(c.ok for c in checks.values() if c.required)  # a store without batches is healthy
        assert storage.batches == 1  # cleanup did not trust delete_many again
        assert "cleanup" not in checks
        assert await scratch_left(inner) == []
    finally:
        await inner.close()


async def test_doctor_leaves_nothing_behind_when_a_check_blows_up(tmp_path):
    from qo.backends import open_storage

    inner = open_storage(str(tmp_path / "store"))

    class Broken(BatchWrapper):
        async def put(self, key, data, **kw):
            if kw.get("if_match"):
                raise RuntimeError("a bug in the middle of the checks")
            return await self.inner.put(key, data, **kw)

    with pytest.raises(RuntimeError):
        await run_checks(Broken(inner, "noop"))
    assert await scratch_left(inner) == []


def test_doctor_cli_prints_the_batch_proof(tmp_path):
    from click.testing import CliRunner

    from qo.cli import cli

    result = CliRunner().invoke(cli, ["doctor", "--url", str(tmp_path / "store")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "batch delete" in x)
    assert "[ok  ]" in line and "yes (proven: 3 objects deleted in one call)" in line


def test_doctor_says_plainly_when_a_store_ignores_conditional_writes():
    from click.testing import CliRunner

    from qo.cli import cli

    with MotoServer(bucket="no-cas", ignore_conditions=True) as server:
        result = CliRunner().invoke(cli, ["doctor", "--url", server.url("x")], catch_exceptions=False)
    assert result.exit_code == 1
    assert "create-only: NOT SUPPORTED" in result.output
    assert "compare-and-swap: NOT SUPPORTED" in result.output
    assert "NOT HEALTHY" in result.output
