"""A two-minute tour: ``python -m qo.demo [--url URL] [--tasks N] [--concurrency N]``.

Submits a batch of demo tasks to a fresh queue, drains it with an in-process worker
(a couple of tasks fail once then succeed; one always fails into the dead letter),
and prints what happened and how to look at it with the ``qo`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shlex
import shutil
import sys
import time
from typing import Any

import qo
from qo.backends import default_url, redact_url
from qo.worker import Worker


async def resize(input: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(random.uniform(0.001, 0.01))  # pretend to work
    return {"thumbnail": f"{input['image']}.thumb.png"}


def send_email(input: dict[str, Any]) -> dict[str, Any]:  # a plain def runs in a thread
    time.sleep(random.uniform(0.001, 0.005))
    return {"sent": True, "to": input["to"]}


async def flaky(input: Any, ctx: Any) -> str:
    if ctx.attempt == 1:
        raise qo.Retry(delay=0, message="upstream busy, try again")
    return f"ok on attempt {ctx.attempt}"


async def doomed(input: Any) -> None:
    raise qo.Fail("this one always fails: see the dead letter")


def demo_items(n: int) -> list[tuple[str, Any, dict[str, Any]]]:
    """``n`` tasks: 2 flaky, 1 doomed, the rest resize/email at mixed priorities."""
    special = [("demo.flaky", {"n": 1}, {}), ("demo.flaky", {"n": 2}, {}), ("demo.doomed", {}, {"max_retries": 0})]
    items = []
    for i in range(max(0, n - len(special))):
        if i % 3:
            items.append(("demo.resize", {"image": f"img-{i:04d}"}, {"priority": "normal"}))
        else:
            items.append(("demo.send_email", {"to": f"user{i}@example.com"}, {"priority": "high"}))
    return items + special[: min(n, len(special))]


def progress(done: int, total: int) -> None:
    if done == total or (sys.stdout.isatty() and done % max(1, total // 50) == 0):
        end = "\n" if done == total else ""
        print(f"\r  submitted {done}/{total}", end=end, flush=True)


async def main(url: str, n: int, concurrency: int) -> int:
    name = time.strftime("demo-%Y%m%d-%H%M%S-") + f"{random.randrange(16**4):04x}"
    queue = await qo.connect(url, queue=name)
    try:
        print(f"qo demo: {n} tasks to queue {name!r} at {redact_url(url)}")
        t0 = time.perf_counter()
        tasks = await queue.submit_many(demo_items(n), progress=progress)
        submit_s = time.perf_counter() - t0

        worker = Worker(queue, concurrency=concurrency, poll_min=0.01, poll_max=0.5)
        for task_type, fn in (("demo.resize", resize), ("demo.send_email", send_email),
                              ("demo.flaky", flaky), ("demo.doomed", doomed)):
            worker.registry.add(task_type, fn)
        print(f"  draining with one in-process worker, concurrency {concurrency} ...", flush=True)
        t0 = time.perf_counter()
        stats = await worker.run(until_idle=True)
        drain_s = time.perf_counter() - t0

        by_status: collections.Counter[str] = collections.Counter()
        dead = []
        async for task in queue.list(limit=None):
            by_status[task.status] += 1
            if task.status == "failed":
                dead.append(task.id)
    finally:
        await queue.close()

    print("\nresults")
    for status, count in sorted(by_status.items(), key=lambda kv: -kv[1]):
        print(f"  {status:<10} {count}")
    print(f"  retried    {stats['retried']} (failed once, then succeeded)")
    print(f"\n  submit  {len(tasks) / max(submit_s, 1e-9):8.0f} tasks/s  ({len(tasks)} in {submit_s:.2f}s)")
    print(f"  drain   {len(tasks) / max(drain_s, 1e-9):8.0f} tasks/s  ({len(tasks)} in {drain_s:.2f}s,"
          " including the idle check)")

    secret = redact_url(url) != url  # credentials or query values: never printed
    where = "" if url == default_url() or secret else f" --url {shlex.quote(url)}"
    note = " (with QO_URL set to your storage URL)" if secret and url != default_url() else ""
    where += f" --queue {name}"
    command = qo_command()
    print(f"\ninspect them{note}")
    print(f"  {command} list{where} --status failed")
    print(f"  {command} status{where} {dead[0] if dead else tasks[0].id}")
    print(f"  {command} list{where}")
    return 0 if sum(by_status.values()) == len(tasks) else 1


def qo_command() -> str:
    """How to run ``qo`` from here: ``qo`` when the shell finds this one, else its full
    path (the demo often runs from a venv that is not activated)."""
    beside = os.path.join(os.path.dirname(sys.executable), "qo")
    found = shutil.which("qo")
    if found and os.path.realpath(found) == os.path.realpath(beside):
        return "qo"
    return shlex.quote(beside) if os.path.exists(beside) else "qo"


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=default_url(), help="storage URL (default: QO_URL, else ./.qo)")
    parser.add_argument("--tasks", type=int, default=200, help="how many tasks (default 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="worker concurrency (default 16)")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    try:
        return asyncio.run(main(args.url, args.tasks, args.concurrency))
    except qo.QoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
