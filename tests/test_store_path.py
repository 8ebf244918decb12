"""Where the store is: the default ./.qo is resolved to an absolute path once, and
read-only commands on a store or queue that does not exist say so and create nothing."""

from __future__ import annotations

import asyncio
import os

import pytest
from click.testing import CliRunner

import qo
from qo.cli import build_cli


def qo_cli(*args: str):
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    for name in ("QO_URL", "QO_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("command", [["list"], ["stats"], ["status", "01a229720a080000f1619dbd"],
                                     ["list", "--status", "failed"]])
def test_read_only_commands_on_a_missing_store_create_nothing(tmp_path, command):
    where = tmp_path / "nonexistent" / "deep" / "dir"
    r = qo_cli(*command, "--url", str(where))
    assert f"queue 'default' at {where} has no objects" in r.stderr
    assert not (tmp_path / "nonexistent").exists()


def test_the_default_store_is_an_absolute_path_and_reading_it_creates_nothing(no_env, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    os.chdir(sub)
    r = qo_cli("list")
    assert r.exit_code == 0
    assert f"queue 'default' at {sub / '.qo'} has no objects" in r.stderr
    assert list(sub.iterdir()) == []

    async def url() -> str:
        async with await qo.connect() as q:
            return q.url

    assert asyncio.run(url()) == str(sub / ".qo")
    r = qo_cli("submit", "t")  # the first write makes the store
    assert r.exit_code == 0 and (sub / ".qo").is_dir()


def test_a_queue_never_used_says_so(storage_url):
    assert qo_cli("submit", "t", "--url", storage_url, "--queue", "used").exit_code == 0
    r = qo_cli("list", "--url", storage_url, "--queue", "neverused")
    assert r.exit_code == 0 and "queue 'neverused' at" in r.stderr and "has no objects" in r.stderr
    r = qo_cli("list", "--url", storage_url, "--queue", "used", "--status", "failed")
    assert r.exit_code == 0 and r.stderr.strip() == "no tasks"  # the queue exists: just none of those


async def test_local_reads_of_a_missing_root_find_nothing_and_make_nothing(tmp_path):
    from qo.backends import open_storage

    root = tmp_path / "a" / "b"
    storage = open_storage(str(root))
    assert await storage.list("") == []
    with pytest.raises(qo.NotFound):
        await storage.get("q/x.json")
    await storage.delete("q/x.json")
    assert not (tmp_path / "a").exists()
    await storage.put("q/x.json", b"{}")
    assert (await storage.get("q/x.json")).data == b"{}"
    assert [e.key for e in await storage.list("")] == ["q/x.json"]
    await storage.close()
