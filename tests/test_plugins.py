"""The plugin manager: entry points, blocking, broken plugins, direct registration, docs."""

from __future__ import annotations

import asyncio
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
    assert info["local"].status == "loaded" and info["local"].distribution == "qo-queue"
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
    assert "s3://" in str(err.value) and "pip install 'qo-queue[s3]'" in str(err.value)


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


# -- third-party distributions that clash or fail to load (issue 15) ------------------


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install fake distributions on sys.path: ``make(dist, {entry_point: module source})``.

    They are real ``*.dist-info`` directories, found by importlib.metadata next to qo's
    own; their modules get unique names and leave sys.modules in teardown.
    """
    import sys
    import uuid

    from qo.plugins import reset_plugins

    made: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dist: str, plugins: dict[str, str]) -> dict[str, str]:
        modules = {}
        lines = ["[qo]"]
        for ep_name, source in plugins.items():
            module = f"qo_fake_{uuid.uuid4().hex[:10]}_{ep_name}"
            (tmp_path / f"{module}.py").write_text(source)
            lines.append(f"{ep_name} = {module}")
            modules[ep_name] = module
            made.append(module)
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        return modules

    reset_plugins()
    yield make
    reset_plugins()
    for module in made:
        sys.modules.pop(module, None)


def test_builtins_are_the_entry_points_of_qo_itself():
    import tomllib
    from pathlib import Path

    from qo.plugins import BUILTINS

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert set(pyproject["project"]["entry-points"]["qo"]) == BUILTINS
    assert ESSENTIAL <= BUILTINS


CRON_HIJACK = """
import datetime as dt
import qo

@qo.hookimpl
def qo_next_fire(schedule, after):
    return dt.datetime(1999, 1, 1, tzinfo=dt.timezone.utc)
"""


def test_a_third_party_plugin_named_like_a_builtin_is_skipped_and_names_both(fake_dist, caplog):
    import sys

    modules = fake_dist("evil-dist", {"cron": CRON_HIJACK, "retry": "raise SystemExit(3)"})
    plugins = Plugins()
    with caplog.at_level("WARNING", logger="qo.plugins"):
        plugins.load_entry_points()
    assert plugins.info["cron"].distribution == "qo-queue" and plugins.info["cron"].status == "loaded"
    assert plugins.info["cron"].source == "qo.policies.cron"
    skipped = {i.name: i for i in plugins.skipped}
    assert set(skipped) == {"cron", "retry"} and all(i.status == "skipped" for i in skipped.values())
    assert skipped["cron"].error == (
        "plugin name 'cron' of distribution 'evil-dist' clashes with qo's built-in 'cron' "
        "(distribution 'qo-queue'); rename its entry point"
    )
    assert modules["cron"] not in sys.modules  # never imported
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'evil-dist'" in w and "'qo-queue'" in w and "'cron'" in w for w in warnings)
    import qo.policies.cron

    assert [i.plugin for i in plugins.hook.qo_next_fire.get_hookimpls()] == [qo.policies.cron]


def test_a_builtin_name_clash_is_fatal_in_strict_mode(fake_dist):
    fake_dist("evil-dist", {"local": "raise RuntimeError('never imported')"})
    plugins = Plugins(strict=True)
    with pytest.raises(qo.PluginError) as err:
        plugins.load_entry_points()
    assert "'evil-dist'" in str(err.value) and "distribution 'qo-queue'" in str(err.value)
    assert "'local'" in str(err.value) and "QO_STRICT_PLUGINS=1" in str(err.value)


def test_two_third_party_plugins_of_one_name_keep_the_first(fake_dist):
    fake_dist("qo-one", {"twin": "import qo\n"})
    fake_dist("qo-two", {"twin": "import qo\n"})
    plugins = Plugins()
    plugins.load_entry_points()
    assert plugins.info["twin"].status == "loaded"
    (skipped,) = [i for i in plugins.skipped if i.name == "twin"]
    first, second = plugins.info["twin"].distribution, skipped.distribution
    assert {first, second} == {"qo-one", "qo-two"}
    assert f"'{first}'" in skipped.error and f"'{second}'" in skipped.error


@pytest.mark.parametrize(
    "source, reason",
    [
        ("import sys\nsys.exit('plugin gave up')\n", "import failed: SystemExit: plugin gave up"),
        ("raise SystemExit(3)\n", "import failed: SystemExit: 3"),
        ("raise KeyboardInterrupt\n", "import failed: KeyboardInterrupt"),
        ("raise RuntimeError('boom\\nsecond line')\n", "import failed: RuntimeError: boom second line"),
        ("import qo_no_such_module_anywhere\n", "import failed: ModuleNotFoundError: No module named"),
    ],
    ids=["sys.exit", "SystemExit", "KeyboardInterrupt", "RuntimeError", "ImportError"],
)
def test_a_plugin_failing_at_import_in_any_way_is_reported_and_skipped(fake_dist, caplog, source, reason):
    fake_dist("qo-bad", {"bad": source})
    plugins = Plugins()
    with caplog.at_level("WARNING", logger="qo.plugins"):
        plugins.load_entry_points()
    assert plugins.info["bad"].status == "broken"
    assert plugins.info["bad"].distribution == "qo-bad"
    assert plugins.info["bad"].error.startswith(reason)
    assert plugins.pm.get_plugin("bad") is None
    assert plugins.info["local"].status == "loaded" and "file" in plugins.schemes()
    (line,) = [r.getMessage() for r in caplog.records if "'bad'" in r.getMessage()]
    assert line.startswith("qo plugin 'bad' (distribution 'qo-bad') not loaded: " + reason)
    assert "\n" not in line


def test_a_plugin_failing_at_import_is_fatal_in_strict_mode(fake_dist):
    fake_dist("qo-bad", {"bad": "raise SystemExit(3)\n"})
    plugins = Plugins(strict=True)
    with pytest.raises(qo.PluginError) as err:
        plugins.load_entry_points()
    assert str(err.value) == (
        "qo plugin 'bad' (distribution 'qo-bad') not loaded: import failed: SystemExit: 3 (QO_STRICT_PLUGINS=1)"
    )


def test_strict_mode_comes_from_the_environment(fake_dist, monkeypatch):
    from qo.plugins import get_plugins, reset_plugins, strict_from_env

    fake_dist("qo-bad", {"bad": "raise KeyboardInterrupt\n"})
    monkeypatch.setenv("QO_STRICT_PLUGINS", "1")
    with pytest.raises(qo.PluginError, match="'qo-bad'.*KeyboardInterrupt"):
        get_plugins()
    monkeypatch.setenv("QO_STRICT_PLUGINS", "0")
    reset_plugins()
    assert get_plugins().info["bad"].status == "broken"
    monkeypatch.setenv("QO_STRICT_PLUGINS", "maybe")
    with pytest.raises(qo.ConfigurationError, match="QO_STRICT_PLUGINS: 'maybe'"):
        strict_from_env()


def test_a_real_ctrl_c_during_a_plugin_import_still_stops_qo(fake_dist):
    import signal

    fake_dist("qo-slow", {"slow": "import signal\nsignal.raise_signal(signal.SIGINT)\n"})
    plugins = Plugins()
    with pytest.raises(KeyboardInterrupt):
        plugins.load_entry_points()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


BAD_HOOKS = """
import qo

@qo.hookimpl
def qo_retry_delay(task, error):
    return 42.0

@qo.hookimpl
def qo_storage(url, options, surprise):
    return None
"""


def test_a_bad_hookimpl_of_a_distribution_is_reported_and_leaves_nothing_behind(fake_dist, caplog):
    fake_dist("qo-hooks", {"hooks": BAD_HOOKS, "typo": "import qo\n@qo.hookimpl\ndef qo_storag(url):\n    pass\n"})
    plugins = Plugins()
    with caplog.at_level("WARNING", logger="qo.plugins"):
        plugins.load_entry_points()
    assert plugins.info["hooks"].status == "broken" and "surprise" in plugins.info["hooks"].error
    assert plugins.info["typo"].status == "broken" and "qo_storag" in plugins.info["typo"].error
    task = qo.Task(id="0" * 24, task_type="t", attempt=1, max_retries=3)
    assert plugins.hook.qo_retry_delay(task=task, error=RuntimeError()) != 42.0  # no half registration
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "qo plugin 'hooks' (distribution 'qo-hooks') not loaded: invalid hook implementation" in messages
    assert "qo plugin 'typo' (distribution 'qo-hooks') not loaded: unknown hook" in messages


async def test_qo_still_works_after_a_bad_plugin_is_skipped(fake_dist, tmp_path):
    fake_dist("qo-bad", {"bad": "raise SystemExit(1)\n", "cron": CRON_HIJACK})
    queue = await qo.connect(str(tmp_path / "store"), queue="q")
    try:
        task = await queue.submit("t", {"x": 1})
        assert (await queue.get(task.id)).status == "pending"
    finally:
        await queue.close()
    from qo.plugins import get_plugins

    assert get_plugins().info["bad"].status == "broken"


def test_plugins_cli_shows_skipped_and_broken_plugins_with_the_reason(fake_dist):
    import json

    from click.testing import CliRunner

    from qo.cli import cli

    fake_dist("evil-dist", {"cron": CRON_HIJACK, "bad": "raise SystemExit(3)\n"})
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["cron", "loaded", "qo-queue"] for line in lines)
    assert any(line.split()[:3] == ["cron", "skipped", "evil-dist"] for line in lines)
    assert any(line.split()[:3] == ["bad", "broken", "evil-dist"] for line in lines)
    assert "error: plugin name 'cron' of distribution 'evil-dist' clashes with qo's built-in 'cron'" in result.output
    assert "error: import failed: SystemExit: 3" in result.output
    assert "not loaded: 2 plugin(s)" in result.output
    rows = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)
    assert {(r["name"], r["status"], r["distribution"]) for r in rows} >= {
        ("cron", "loaded", "qo-queue"), ("cron", "skipped", "evil-dist"), ("bad", "broken", "evil-dist")}


def test_strict_mode_makes_the_cli_fail_with_one_line(fake_dist, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("QO_STRICT_PLUGINS", "1")
    fake_dist("qo-bad", {"bad": "raise RuntimeError('boom')\n"})
    env = {**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", "from qo.cli import main; main()", "plugins"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: qo plugin 'bad' (distribution 'qo-bad') not loaded: import failed: RuntimeError: boom (QO_STRICT_PLUGINS=1)"
    )


async def test_worker_started_and_stopping_bracket_each_run(queue, fast_settings, caplog):
    from qo.plugins import get_plugins
    from qo.worker import Worker

    class Watcher:
        def __init__(self):
            self.calls = []

        @qo.hookimpl
        def qo_worker_started(self, worker):
            asyncio.get_running_loop()  # on the worker's loop: it may start a task there
            self.calls.append(("started", worker.worker_id, len(worker._running)))

        @qo.hookimpl
        def qo_worker_stopping(self, worker):
            self.calls.append(("stopping", worker.worker_id, len(worker._running)))
            raise RuntimeError("a broken plugin")  # logged, the shutdown goes on

    watcher = Watcher()
    plugins = get_plugins()
    plugins.register(watcher, name="test-lifecycle")
    try:
        worker = Worker(queue, settings=fast_settings)
        worker.handler("t")(lambda v: v)
        await queue.submit("t", 1)
        for _ in range(2):
            await worker.run(until_idle=True)
    finally:
        plugins.unregister("test-lifecycle")
    assert watcher.calls == [("started", worker.worker_id, 0), ("stopping", worker.worker_id, 0)] * 2
    assert "a qo_worker_stopping plugin failed" in caplog.text


# -- a backend written against an older contract (issue 26) ----------------------------


class DictStorage:
    """A third-party backend as last month's docs described one: the five methods over a
    dict, no ``name`` (the contract gained it since)."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.writes = 0

    async def get(self, key):
        if key not in self.objects:
            raise qo.NotFound("no such key", key=key)
        return qo.storage.Blob(*self.objects[key])

    async def put(self, key, data, *, if_match=None, if_none_match=False):
        current = self.objects.get(key)
        if (if_none_match and current is not None) or (if_match is not None and (current or (b"", ""))[1] != if_match):
            raise qo.PreconditionFailed("lost", key=key)
        self.writes += 1
        self.objects[key] = (bytes(data), f'"{self.writes}"')
        return self.objects[key][1]

    async def delete(self, key, *, if_match=None):
        self.objects.pop(key, None)

    async def list(self, prefix, *, start_after=None, limit=1000):
        keys = sorted((k for k in self.objects if k.startswith(prefix) and (start_after is None or k > start_after)),
                      key=str.encode)
        return [qo.storage.Entry(k, self.objects[k][1], len(self.objects[k][0])) for k in keys[:limit]]

    async def close(self):
        pass


class NoList(DictStorage):
    list = None  # (a subclass cannot delete an inherited method: None is "not there")


class SyncClose(DictStorage):
    def close(self):
        pass


class NumberName(DictStorage):
    name = 5


class GetBreaks(DictStorage):
    """Once broken: an AttributeError from every read of a task (a claim's), as a backend
    reaching for a member the engine does not have would raise."""

    broken = False

    async def get(self, key):
        if self.broken and "/tasks/" in key:
            raise AttributeError("'GetBreaks' object has no attribute 'session'")
        return await super().get(key)


class ListBreaks(DictStorage):
    """Once broken: a TypeError from every listing of ready tasks (the feed's)."""

    broken = False

    async def list(self, prefix, *, start_after=None, limit=1000):
        if self.broken and "/ready/" in prefix:
            raise TypeError("list() got an unexpected keyword argument 'shards'")
        return await super().list(prefix, start_after=start_after, limit=limit)


class DictBackends:
    """Serves ``dict://CLASS``: a fresh storage of that class of this module."""

    @qo.hookimpl
    def qo_storage_schemes(self):
        return ["dict"]

    @qo.hookimpl
    def qo_storage(self, url, options):
        if not url.startswith("dict://"):
            return None
        return globals()[url.removeprefix("dict://")]()


@pytest.fixture
def dict_backend():
    from qo.plugins import get_plugins

    plugins = get_plugins()
    plugins.register(DictBackends(), name="test-dict")
    yield
    plugins.unregister("test-dict")


async def test_a_backend_without_a_name_is_named_by_its_scheme_and_drains_a_queue(dict_backend, fast_settings):
    from qo.worker import Worker

    queue = await qo.connect("dict://DictStorage", queue="q")
    try:
        assert queue.storage.name == "dict"
        tasks = [await queue.submit("t", i) for i in range(5)]
        worker = Worker(queue, settings=fast_settings)
        worker.handler("t")(lambda v: v * 2)
        stats = await asyncio.wait_for(worker.run(until_idle=True), 60)
        done = [await queue.get(t.id) for t in tasks]
        assert [(t.status, t.output) for t in done] == [("completed", 2 * i) for i in range(5)]
        assert stats["errors"] == 0
    finally:
        await queue.close()


@pytest.mark.parametrize("cls, words", [
    ("NoList", "has no method list()"),
    ("SyncClose", "has a close() that is not an async method"),
    ("NumberName", "has no str name (found int)"),
])
async def test_a_backend_lacking_a_member_of_the_contract_fails_at_connect_naming_it(dict_backend, cls, words):
    with pytest.raises(qo.PluginError) as info:
        await qo.connect(f"dict://{cls}", queue="q")
    message = str(info.value)
    assert words in message and f"test_plugins.{cls}" in message and "plugin 'test-dict'" in message, message
    assert "dict:// URLs" in message and "\n" not in message


def test_the_cli_says_in_one_line_which_member_a_backend_lacks(dict_backend):
    from click.testing import CliRunner

    from qo.cli import build_cli

    result = CliRunner().invoke(build_cli(), ["submit", "t", "--url", "dict://NoList"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()] and "no method list()" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("cls, error", [
    ("GetBreaks", "AttributeError: 'GetBreaks' object has no attribute 'session'"),
    ("ListBreaks", "TypeError: list() got an unexpected keyword argument 'shards'"),
])
async def test_an_exception_a_backend_raises_in_the_worker_loop_ends_a_drain(dict_backend, fast_settings, caplog,
                                                                             cls, error):
    """It looped for good (an AttributeError per claim, forever), or ended the worker's
    slots silently (a listing's TypeError): now the drain ends once it has lasted
    storage_failure_limit, naming the error; its traceback is logged once."""
    import re

    import attrs

    from qo.worker import Worker

    queue = await qo.connect(f"dict://{cls}", queue="q")
    try:
        task = await queue.submit("t", 1)
        queue.storage.broken = True
        worker = Worker(queue, settings=attrs.evolve(fast_settings, storage_failure_limit=0.5))
        worker.handler("t")(lambda v: v)
        with pytest.raises(qo.StorageError, match=re.escape(error)):
            await asyncio.wait_for(worker.run(until_idle=True), 60)
        queue.storage.broken = False
        assert (await queue.get(task.id)).status == "pending"  # not lost: the next worker runs it
        assert caplog.text.count("Traceback") <= 2  # (once per kind of work, not per try)
    finally:
        await queue.close()


async def test_a_listing_that_raises_a_type_error_is_an_outage_the_worker_outlives(dict_backend, fast_settings):
    """A TypeError from the feed's listing ended every slot of the worker, silently (the
    worker went on, running nothing): now it is backed off and the work goes on after."""
    from qo.worker import Worker

    queue = await qo.connect("dict://ListBreaks", queue="q")
    try:
        task = await queue.submit("t", 1)
        queue.storage.broken = True
        worker = Worker(queue, settings=fast_settings)
        worker.handler("t")(lambda v: v + 1)
        running = asyncio.create_task(worker.run())

        def failures() -> int:
            return worker.outages["listing ready tasks"].failures

        for _ in range(600):
            if failures() >= 2:
                break
            await asyncio.sleep(0.05)
        assert failures() >= 2 and not running.done()
        queue.storage.broken = False
        for _ in range(600):
            if (await queue.get(task.id)).status == "completed":
                break
            await asyncio.sleep(0.05)
        assert (await queue.get(task.id)).output == 2
        worker.stop()
        await asyncio.wait_for(running, 30)
    finally:
        await queue.close()
