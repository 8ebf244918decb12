"""Retention and purge (issue 16): finished tasks leave the bucket after their retention,
at a cost that follows what is deleted, never a task whose idempotency key lives or that
a dependent waits on."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
from click.testing import CliRunner

import qo
from qo import keys
from qo.cli import cli
from qo.clock import FakeClock
from qo.counting import CountingStorage
from qo.retention import apply_retention
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5)
DAY = 86400.0


async def run_all(q, **handlers) -> None:
    w = Worker(q, concurrency=8, **FAST)
    for name, fn in handlers.items():
        w.handler(name)(fn)
    await asyncio.wait_for(w.run(until_idle=True), 60)


def fail(input):
    raise qo.Fail("no")


async def later(url: str, days: float, **kw) -> qo.Queue:
    """The same queue, seen ``days`` from now (a fake clock)."""
    import time

    return await qo.connect(url, queue="q", clock=FakeClock(time.time() + days * DAY), **kw)


async def task_keys(q) -> set[str]:
    return {keys.task_id_of(e.key) for e in await q.storage.list("q/tasks/")}


async def test_purge_deletes_only_what_is_old_enough_of_that_status(storage_url):
    q = await qo.connect(storage_url, queue="q")
    done = await q.submit_many([("ok", i) for i in range(6)], bulk=False)  # packs: tests/test_packs.py
    dead = [await q.submit("bad", i, max_retries=0) for i in range(2)]
    waiting = await q.submit("nobody", 1)
    await run_all(q, ok=lambda input: input, bad=fail)
    soon = await later(storage_url, 0.5)
    assert await soon.purge("completed", dt.timedelta(days=1)) == 0  # not old enough
    future = await later(storage_url, 8)
    assert await future.purge("completed", dt.timedelta(days=1), dry_run=True) == 6
    assert await task_keys(q) >= {t.id for t in done}  # a dry run deletes nothing
    assert await future.purge("completed", dt.timedelta(days=1), task_type="other") == 0
    assert await future.purge("completed", dt.timedelta(days=1)) == 6
    assert await task_keys(q) == {t.id for t in dead} | {waiting.id}
    assert await future.purge("failed", dt.timedelta(days=1)) == 2
    assert await task_keys(q) == {waiting.id}
    assert await q.storage.list(keys.ended_prefix("q")) == []  # their index entries went with them
    assert (await q.stats())["counts"]["failed"] == 0
    for x in (q, soon, future):
        await x.close()


async def test_retention_keeps_a_task_while_its_idempotency_key_lives(storage_url):
    q = await qo.connect(storage_url, queue="q")
    keyed = await q.submit("ok", 1, idempotency_key="order-1", idempotency_ttl_days=10)
    plain = await q.submit("ok", 2)
    await run_all(q, ok=lambda input: input)
    at8 = await later(storage_url, 8)
    assert await at8.purge("completed", dt.timedelta(days=7)) == 1
    assert await task_keys(q) == {keyed.id}
    again = await at8.submit("ok", 1, idempotency_key="order-1", idempotency_ttl_days=10)
    assert again.id == keyed.id and again.status == "completed"  # the key's answer holds
    at11 = await later(storage_url, 11)
    assert await at11.purge("completed", dt.timedelta(days=7)) == 1
    assert plain.id not in await task_keys(q)
    for x in (q, at8, at11):
        await x.close()


async def test_retention_keeps_a_parent_while_a_dependent_waits_on_it(storage_url):
    q = await qo.connect(storage_url, queue="q")
    a = await q.submit("ok", "a")
    b = await q.submit("slow", "b")  # nobody runs it yet
    child = await q.submit("child", None, depends_on=[a.id, b.id])
    await run_all(q, ok=lambda input: input)
    assert (await q.get(child.id)).status == "blocked"
    at8 = await later(storage_url, 8)
    assert await at8.purge("completed", dt.timedelta(days=1)) == 0  # the child will read a's output
    seen = {}

    async def child_handler(input, ctx):
        seen.update(ctx.dependencies)
        return "done"

    await run_all(q, slow=lambda input: input, child=child_handler)
    assert seen[a.id]["output"] == "a" and seen[b.id]["output"] == "b"
    at9 = await later(storage_url, 9)
    assert await at9.purge("completed", dt.timedelta(days=1)) == 3
    assert await q.storage.list("q/deps/") == []
    for x in (q, at8, at9):
        await x.close()


async def test_retention_pass_uses_the_queue_settings_and_costs_what_it_deletes(storage_url):
    q = await qo.connect(storage_url, queue="q")
    await q.settings.set(retention_completed="2d", retention_failed="5d")
    await q.submit_many([("ok", i) for i in range(20)], bulk=False)  # packs: tests/test_packs.py
    for i in range(3):
        await q.submit("bad", i, max_retries=0)
    await run_all(q, ok=lambda input: input, bad=fail)
    at3 = await later(storage_url, 3, wrap_storage=CountingStorage)
    deleted = await apply_retention(at3)
    assert deleted == {"completed": 20}
    at3.storage.reset()
    assert await apply_retention(at3) == {}  # nothing left to delete ...
    assert at3.storage.counts().get("GET", 0) <= 1  # ... costs no task read (at most the settings)
    at6 = await later(storage_url, 6)
    assert await apply_retention(at6) == {"failed": 3}
    assert await task_keys(q) == set()
    for x in (q, at3, at6):
        await x.close()


@pytest.mark.parametrize("args, field", [
    (("pending", 86400), "status"), (("running", 86400), "status"), (("completed", 10), "older_than"),
    (("completed", -5), "older_than"), (("completed", "1d"), "older_than"), (("completed", float("nan")), "older_than"),
    (("completed", 86400, "not a type!"), "task_type"),
])
async def test_bad_purge_arguments_name_the_field_and_delete_nothing(queue, args, field):
    t = await queue.submit("ok", 1)
    with pytest.raises(qo.InvalidInput) as err:
        await queue.purge(*args)
    assert err.value.field == field
    assert (await queue.get(t.id)).id == t.id


def test_cli_purge_and_retention_settings(storage_url):
    async def setup():
        q = await qo.connect(storage_url, queue="q")
        await q.submit_many([("ok", i) for i in range(3)])
        await run_all(q, ok=lambda input: input)
        await q.close()

    asyncio.run(setup())
    runner = CliRunner()
    base = ["--url", storage_url, "--queue", "q"]
    out = runner.invoke(cli, ["settings", "set", "retention_completed=7d", *base])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["settings", "set", "retention_failed=10s", *base])
    assert out.exit_code == 1 and "retention_failed: 10s is outside 1m to 3650d" in out.stderr
    out = runner.invoke(cli, ["purge", "--status", "completed", "--older-than", "1m", "--dry-run", "--json", *base])
    assert out.exit_code == 0 and json.loads(out.stdout)["would_delete"] == 0  # ended just now
    out = runner.invoke(cli, ["purge", "--status", "completed", "--older-than", "5s", "--yes", *base])
    assert out.exit_code == 1 and "--older-than" in out.stderr
    out = runner.invoke(cli, ["purge", "--status", "completed", "--older-than", "1d", *base], input="")
    assert out.exit_code != 0  # neither --yes nor a terminal: nothing is deleted
    out = runner.invoke(cli, ["purge", "--status", "pending", "--older-than", "1d", "--yes", *base])
    assert out.exit_code == 2
