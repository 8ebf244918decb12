"""Configuration: precedence default < [tool.qo] < qo.toml < environment < flags."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import qo
from qo.config import load
from qo.plugins import Plugins, disabled_from_env

ENV = ("QO_URL", "QO_QUEUE", "QO_DISABLE_PLUGINS", "QO_CONCURRENCY", "QO_POLL_MAX", "QO_LEASE_TTL")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_each_layer_overrides_the_one_below(workdir, monkeypatch):
    assert load()["queue"] == "default" and load().settings["queue"].source == "default"
    (workdir / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.qo]\nqueue = "a"\nconcurrency = 4\n')
    assert load()["queue"] == "a" and load()["concurrency"] == 4
    (workdir / "qo.toml").write_text('queue = "b"\n')
    cfg = load()
    assert cfg["queue"] == "b" and cfg.settings["queue"].source == "qo.toml"
    assert cfg.settings["concurrency"].source == "pyproject.toml [tool.qo]"
    monkeypatch.setenv("QO_QUEUE", "c")
    assert load()["queue"] == "c" and load().settings["queue"].source == "env QO_QUEUE"
    flagged = load().with_flags(queue="d", url=None)
    assert flagged["queue"] == "d" and flagged.settings["queue"].source == "--queue"
    assert flagged.settings["url"].source == "default"


def test_unknown_keys_and_bad_values_are_errors_naming_them(workdir, monkeypatch):
    (workdir / "qo.toml").write_text("concurency = 3\n")
    with pytest.raises(qo.ConfigurationError) as err:
        load()
    assert "concurency" in str(err.value) and "qo.toml" in str(err.value)
    (workdir / "qo.toml").write_text("concurrency = 0\n")
    with pytest.raises(qo.ConfigurationError) as err:
        load()
    assert "concurrency" in str(err.value)
    (workdir / "qo.toml").unlink()
    monkeypatch.setenv("QO_POLL_MAX", "soon")
    with pytest.raises(qo.ConfigurationError) as err:
        load()
    assert "QO_POLL_MAX" in str(err.value)


async def test_connect_uses_the_configured_url_and_queue(workdir):
    store = workdir / "store"
    (workdir / "qo.toml").write_text(f'url = "{store}"\nqueue = "mail"\n')
    q = await qo.connect()
    assert q.name == "mail" and q.url == str(store)
    task = await q.submit("t", 1)
    await q.close()
    assert (store / "mail" / "tasks" / f"{task.id}.json").exists()


def test_a_config_file_can_block_a_plugin(workdir):
    (workdir / "qo.toml").write_text('disable_plugins = ["s3"]\n')
    plugins = Plugins(disabled=disabled_from_env())
    plugins.load_entry_points()
    assert plugins.info["s3"].status == "blocked" and plugins.info["local"].status == "loaded"


def test_qo_config_shows_values_and_sources_with_the_url_redacted(workdir, monkeypatch):
    from qo.cli import cli

    (workdir / "qo.toml").write_text('url = "s3://bucket/p?endpoint_url=http://10.0.0.1&profile=secret-profile"\n')
    monkeypatch.setenv("QO_CONCURRENCY", "16")
    result = CliRunner().invoke(cli, ["config", "--queue", "jobs"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "s3://bucket/p?endpoint_url=...&profile=..." in lines["url"] and "(qo.toml)" in lines["url"]
    assert "secret-profile" not in result.output
    assert "16" in lines["concurrency"] and "(env QO_CONCURRENCY)" in lines["concurrency"]
    assert "jobs" in lines["queue"] and "(--queue)" in lines["queue"]
