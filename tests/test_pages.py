"""``queue.page``: tasks newest first with a cursor, at a bounded cost per page; and
``queue.ended_times``, ``queue.dependents``, ``queue.effective_priority``; ``qo list --after``."""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

import pytest
from click.testing import CliRunner

import qo
from qo import keys
from qo.cli import build_cli
from qo.pages import MAX_LISTS, MAX_READS


async def write_ended(queue: Any, n: int, status: str = "failed", task_type: str = "old",
                      age: float = 60.0) -> list[str]:
    """``n`` tasks that ended ``status`` (with their ended/ entries when indexed), written
    directly, newest first in the result: a long history without running it."""
    now = queue.clock.now()
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        task = queue.build_task(task_type, {"i": i})
        task.status, task.updated_at = status, now - age - i
        task.finished_at, task.attempt = now - age - i, 1
        async with sem:
            await queue.storage.put(keys.task(queue.name, task.id), task.to_json(), if_none_match=True)
            if task.ended_key(queue.name):
                await queue.store.put_marker(task.ended_key(queue.name))
        return task.id

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def all_pages(queue: Any, *args: Any, limit: int, **kw: Any) -> list[list[str]]:
    pages, after = [], None
    for _ in range(50):
        page = await queue.page(*args, after=after, limit=limit, **kw)
        assert page.lists <= MAX_LISTS and page.reads <= max(MAX_READS, limit)
        pages.append([t.id for t in page.tasks])
        after = page.next_cursor
        if after is None:
            return pages
    raise AssertionError("no end of pages")


async def test_failed_pages_newest_first_with_a_cursor(queue):
    ids = await write_ended(queue, 7, "failed")  # ids[0] ended last
    await write_ended(queue, 2, "cancelled")
    pages = await all_pages(queue, "failed", limit=3)
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert [t.id async for t in queue.list("failed", newest_first=True)] == ids
    first = await queue.page("failed", limit=3)
    assert isinstance(first, qo.TaskPage) and first.lists == 1 and first.reads == 3 and not first.capped
    # a type filter and since
    others = await write_ended(queue, 2, "failed", task_type="other", age=10)
    assert [t.id for t in (await queue.page("failed", "other")).tasks] == others
    assert [t.id for t in (await queue.page("failed", since=30.0 + queue.clock.now() - 60)).tasks] == others


async def test_pending_and_any_status_pages(queue):
    submitted = [(await queue.submit("p", {"i": i})).id for i in range(5)]
    newest = sorted(submitted, reverse=True)
    assert sum(await all_pages(queue, "pending", limit=2), []) == newest
    assert await all_pages(queue, "pending", limit=2) == [newest[0:2], newest[2:4], newest[4:]]
    ended = await write_ended(queue, 3, "failed")
    everything = sum(await all_pages(queue, None, limit=3), [])
    assert everything == [t.id async for t in queue.list(limit=None, newest_first=True)]
    assert set(everything) == set(submitted) | set(ended)
    assert sum(await all_pages(queue, None, "p", limit=2), []) == newest
    assert (await queue.page("running")).tasks == [] and (await queue.page("blocked")).next_cursor is None
    assert (await queue.page("completed")).tasks == []


async def test_page_checks_its_arguments(queue):
    await write_ended(queue, 2, "failed")
    for kwargs, field in [(dict(status="done"), "status"), (dict(limit=0), "limit"), (dict(limit=501), "limit"),
                          (dict(limit=True), "limit"), (dict(task_type="no spaces"), "task_type"),
                          (dict(after=""), "after"), (dict(after=5), "after"), (dict(since="yesterday"), "since")]:
        with pytest.raises(qo.InvalidInput) as err:
            await queue.page(**kwargs)
        assert err.value.field == field, kwargs
    cursor = (await queue.page("failed", limit=1)).next_cursor
    assert cursor is not None
    for status in ("pending", "cancelled", None, "completed"):  # a failed cursor belongs to the failed listing
        with pytest.raises(qo.InvalidInput) as err:
            await queue.page(status, after=cursor)
        assert err.value.field == "after"
    with pytest.raises(qo.InvalidInput, match="after"):
        await queue.page("failed", after="q/ended/failed/../x")


async def test_a_page_costs_the_same_whatever_the_history(storage_url, backend):
    from qo.counting import CountingStorage

    async with await qo.connect(storage_url, queue="q", wrap_storage=CountingStorage) as queue:
        await write_ended(queue, 3, "failed")
        await write_ended(queue, 3, "completed")

        async def cost(**kw: Any) -> dict[str, int]:
            before = queue.storage.counts()
            page = await queue.page(**kw)
            after = queue.storage.counts()
            spent = {op: after.get(op, 0) - before.get(op, 0) for op in after if after.get(op, 0) != before.get(op, 0)}
            assert spent.get("LIST", 0) == page.lists and spent.get("GET", 0) == page.reads, (kw, spent, page)
            return spent

        few = {s: await cost(status=s, limit=20) for s in ("failed", "completed", None)}
        await write_ended(queue, 120, "failed", age=1000)
        await write_ended(queue, 120, "completed", age=1000)
        many = {s: await cost(status=s, limit=20) for s in ("failed", "completed", None)}
        print(f"\n[{backend}] one page of 20: {few} -> {many}")
        assert many["failed"] == {"LIST": 1, "GET": 20}
        for s in ("completed", None):
            assert many[s]["LIST"] == few[s]["LIST"] and many[s]["GET"] <= MAX_READS


async def test_ended_times_dependents_effective_priority(queue):
    old = await write_ended(queue, 3, "failed", task_type="a", age=7200)
    new = await write_ended(queue, 2, "failed", task_type="b", age=30)
    times = await queue.ended_times("failed")
    assert [t[1] for t in times] == new + old and [t[2] for t in times] == ["b"] * 2 + ["a"] * 3
    assert all(isinstance(t[0], float) for t in times)
    assert [t[1] for t in await queue.ended_times("failed", since=queue.clock.now() - 3600)] == new
    assert await queue.ended_times("cancelled") == []
    with pytest.raises(qo.InvalidInput) as err:
        await queue.ended_times("completed")
    assert err.value.field == "status"
    parent = await queue.submit("p", {})
    child = await queue.submit("c", {}, depends_on=[parent.id])
    assert await queue.dependents(parent.id) == [(child.id, "c")]
    assert await queue.dependents(child.id) == []
    with pytest.raises(qo.InvalidInput):
        await queue.dependents("nope")
    assert queue.effective_priority(parent) == parent.priority


def test_sync_page(storage_url):
    with qo.connect_sync(storage_url, queue="q") as q:
        ids = [q.submit("p").id for _ in range(3)]
        page = q.page("pending", limit=2)
        assert [t.id for t in page.tasks] == sorted(ids, reverse=True)[:2] and page.next_cursor
        assert [t.id for t in q.page("pending", after=page.next_cursor).tasks] == [min(ids)]
        assert q.ended_times() == [] and q.dependents(ids[0]) == []


def test_cli_list_pages_with_after(storage_url):
    async def seed() -> list[str]:
        async with await qo.connect(storage_url, queue="q") as queue:
            return await write_ended(queue, 5, "failed")

    ids = asyncio.run(seed())
    base = ["list", "--url", storage_url, "--queue", "q", "--status", "failed", "--newest-first"]
    r = CliRunner().invoke(build_cli(), base + ["--page-size", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ids[:2]
    more = [line for line in r.stderr.splitlines() if line.startswith("more: qo list ")]
    assert len(more) == 1 and "--after" in more[0]

    def next_args(line: str) -> list[str]:
        args = shlex.split(line[len("more: qo "):])
        if "--url" not in args:  # left out when it holds query values (s3 and azure test URLs do)
            assert qo.redact_url(storage_url) != storage_url
            args += ["--url", storage_url]
        return args

    args = next_args(more[0])
    assert args[args.index("--page-size") + 1] == "2" and args[args.index("--status") + 1] == "failed"
    assert args[args.index("--queue") + 1] == "q"
    seen = ids[:2]
    while True:
        r = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        seen += [line.split()[0] for line in r.stdout.splitlines()[1:]]
        more = [line for line in r.stderr.splitlines() if line.startswith("more: ")]
        if not more:
            break
        args = next_args(more[0])
    assert seen == ids
    # without --page-size/--after: the listing as before, no cursor
    r = CliRunner().invoke(build_cli(), base, catch_exceptions=False)
    assert r.exit_code == 0 and "more:" not in r.stderr and len(r.stdout.splitlines()) == 6
    r = CliRunner().invoke(build_cli(), base[:-1] + ["--page-size", "2"])
    assert r.exit_code == 2 and "--newest-first" in r.output
    r = CliRunner().invoke(build_cli(), base + ["--after", "q/tasks/x"])
    assert r.exit_code == 1 and "after" in r.output


async def test_a_page_stopped_at_its_bound_says_so_and_goes_on(queue, backend):
    if backend != "local":
        pytest.skip("writing 250 tasks to moto or Azurite takes too long for this suite; the bound is the same code")
    wanted = await write_ended(queue, 1, "completed", task_type="y", age=5000)
    await write_ended(queue, 250, "completed", task_type="x", age=100)
    first = await queue.page("completed", "y", limit=5)
    assert first.tasks == [] and first.reads == MAX_READS and first.capped and first.next_cursor is not None
    second = await queue.page("completed", "y", after=first.next_cursor, limit=5)
    assert [t.id for t in second.tasks] == wanted and second.next_cursor is None and not second.capped
    # a page that stops because it is full is not capped
    full = await queue.page("completed", limit=5)
    assert len(full.tasks) == 5 and full.next_cursor is not None and not full.capped
