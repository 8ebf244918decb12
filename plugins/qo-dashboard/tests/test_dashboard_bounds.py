"""One page view costs a bounded number of requests whatever the queue's history.

Each page is measured with the queue's CountingStorage on a queue with a short history
and on the same queue after a long one (many failed and completed tasks): the counts
are equal, or within the stated bound. The figures are in the plugin's README.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qo.pages import MAX_LISTS, MAX_READS

from dashboard_helpers import write_ended, write_worker

PAGES = ["/", "/fragments/overview", "/tasks", "/tasks?status=failed", "/tasks?status=completed",
         "/tasks?status=pending", "/dead-letters", "/schedules", "/limits", "/costs"]


async def measure(client: Any, queue: Any, path: str) -> dict[str, int]:
    before = queue.storage.counts()
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    after = queue.storage.counts()
    return {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}


async def costs(client: Any, queue: Any, paths: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for path in paths:
        out[path] = await measure(client, queue, path)
    return out


@pytest.fixture
async def small(queue):
    await write_ended(queue, 3, "failed")
    await write_ended(queue, 3, "completed")
    await queue.submit("p", {})
    await queue.schedules.add("s1", cron="0 3 * * *", task_type="r")
    await queue.limits.set("global", rate=5)
    await write_worker(queue, "w1", completed=5)
    return queue


async def test_page_costs_do_not_grow_with_history(client, small, queue, backend):
    few = await costs(client, queue, PAGES)
    failed = await write_ended(queue, 150, "failed")
    await write_ended(queue, 150, "completed")
    many = await costs(client, queue, PAGES + [f"/tasks/{failed[0]}"])
    print(f"\n[{backend}] requests per page view (few -> 150 failed + 150 completed more):")
    for path in PAGES + [f"/tasks/{failed[0]}"]:
        print(f"  {path:<28} {few.get(path, '-')!s:<40} {many[path]}")
    for path in ("/", "/fragments/overview", "/schedules", "/limits", "/costs"):
        assert few[path] == many[path], path
    for path in ("/tasks", "/tasks?status=failed", "/tasks?status=completed", "/dead-letters"):
        # a page of 50 reads 50 tasks; completed has no index: read 32 at a time to find them
        reads = MAX_READS if "completed" in path else 50
        assert many[path].get("LIST", 0) <= MAX_LISTS and many[path].get("GET", 0) <= reads, (path, many[path])
        assert many[path].get("LIST", 0) == few[path].get("LIST", 0), path  # one page of each index either way
    # a task page: the task, its schedules' check (1 LIST + 1 GET per schedule)
    assert sum(many[f"/tasks/{failed[0]}"].values()) == 3
    # nothing but reads
    assert all(set(c) <= {"GET", "LIST"} for c in many.values())


async def test_bounds_past_an_index_page(make_client, queue, backend):
    """Past 1000 entries of an index a page view costs more LISTs, never more than the bound."""
    if backend != "local":
        pytest.skip("writing 2,000 tasks to moto takes too long for this suite; the bound is the same code")
    client = await make_client()
    await write_ended(queue, 5, "failed")
    few = await costs(client, queue, ["/", "/dead-letters", "/tasks"])
    await asyncio.gather(write_ended(queue, 1100, "failed"), write_ended(queue, 1100, "completed", "done"))
    many = await costs(client, queue, ["/", "/dead-letters", "/tasks", "/tasks?status=completed&type=done"])
    print(f"\n[{backend}] past 1000: few {few}\n  many {many}")
    # stats lists at most 10 pages per index; the chart reads one page of failures
    assert many["/"]["LIST"] <= few["/"]["LIST"] + 9 * 4 and many["/"].get("GET", 0) == few["/"].get("GET", 0)
    assert many["/dead-letters"] == few["/dead-letters"] | {"GET": 50}
    for path in ("/tasks", "/tasks?status=completed&type=done"):
        assert many[path]["LIST"] <= MAX_LISTS and many[path]["GET"] <= MAX_READS
