"""Putting a queue in a known state quickly: real workers for real errors, and direct
writes (the task object and its ended/ index entry) for a long history."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import qo
from qo import keys
from qo.worker import WorkerSettings

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)


async def run_worker(queue: Any) -> None:
    """Drain the queue: ``ok`` completes, ``boom`` raises ValueError (dead letter at once)."""
    worker = qo.Worker(queue, concurrency=4, settings=WorkerSettings(**FAST))

    @worker.handler("ok")
    def ok(input: Any, ctx: Any) -> Any:
        return {"done": input}

    @worker.handler("boom")
    def boom(input: Any, ctx: Any) -> Any:
        raise qo.Fail(f"cannot handle {input!r}")

    await asyncio.wait_for(worker.run(until_idle=True), 30)


async def write_ended(queue: Any, n: int, status: str = "failed", task_type: str = "old") -> list[str]:
    """``n`` tasks that ended ``status`` (with their ended/ entries when indexed), written
    directly: a long history without running it."""
    now = queue.clock.now()
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        task = queue.build_task(task_type, {"i": i})
        task.status, task.created_at, task.updated_at = status, now - 3600 - i, now - 60 - i
        task.finished_at, task.attempt = now - 60 - i, 1
        if status == "failed":
            task.last_error = {"type": "ValueError", "message": f"old failure {i}", "traceback": "", "attempt": 1}
        async with sem:
            await queue.storage.put(keys.task(queue.name, task.id), task.to_json(), if_none_match=True)
            if task.ended_key(queue.name):
                await queue.store.put_marker(task.ended_key(queue.name))
        return task.id

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def write_worker(queue: Any, worker_id: str, *, alive: bool = True, completed: int = 0, failed: int = 0,
                       leases: dict[str, dict[str, str]] | None = None, **extra: Any) -> None:
    """A worker's heartbeat record as a worker writes it (``extra``: fields of newer workers)."""
    now = queue.clock.now()
    record = {"worker_id": worker_id, "pid": 1, "host": "host-a", "lease_ttl": 30.0,
              "heartbeat_at": now - (2.0 if alive else 120.0), "leases": leases or {}, "started_at": now - 600,
              "counts": {"claimed": completed + failed, "completed": completed, "failed": failed}, **extra}
    await queue.storage.put(keys.worker(queue.name, worker_id), json.dumps(record).encode())
