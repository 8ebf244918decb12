"""What aging costs on a backlog: requests per completed task with aging off, then on.

    python benchmarks/backlog.py [--seconds 300] [--tasks 2000] [--concurrency 32]
        [--task-seconds 2] [--latency-ms 25] [--aging-step-seconds 60] [--modes off,on] [--json-only]

For each mode (same run, one after the other, each on a fresh prefix of one moto S3
server that adds ``--latency-ms`` to every request): ``--tasks`` tasks are queued at
priorities drawn uniformly from 0-255 (fixed seed), then one worker with
``--concurrency`` slots runs tasks that sleep ``--task-seconds`` for ``--seconds``,
while a producer keeps the backlog at ``--tasks`` (one new task, of a priority drawn
the same way, per completed one): a queue that stays overloaded for the whole run,
where low-priority tasks wait for minutes and aging has work to do.

Requests are counted by ``qo.counting.CountingStorage`` on the worker's connection only
(the producer has its own, uncounted connection: submitting costs the same in both
modes). The figure is the worker's requests in the window divided by the tasks it
completed in the window, by operation. One JSON object per mode on stdout; progress on
stderr unless ``--json-only``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import qo  # noqa: E402
from bench import BenchError, S3Server, load_average, local_clock, per_task  # noqa: E402
from qo.aging import AgingSettings  # noqa: E402
from qo.counting import CountingStorage  # noqa: E402
from qo.worker import Worker  # noqa: E402

QUEUE = "backlog"
TASK_TYPE = "sleep"
SEED = 16


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.json_only:
        print(f"[backlog] {msg}", file=sys.stderr, flush=True)


async def run_mode(url: str, aging: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Queue the backlog, run one worker for ``args.seconds`` keeping the backlog full,
    and return the worker's requests per completed task."""
    rng = random.Random(SEED)
    producer_q = await qo.connect(url, queue=QUEUE, clock=local_clock())
    q = await qo.connect(url, queue=QUEUE, wrap_storage=CountingStorage, clock=local_clock())
    counter = q.backend
    assert isinstance(counter, CountingStorage)
    try:
        t0 = time.perf_counter()
        await producer_q.submit_many(
            [(TASK_TYPE, {"i": i}, {"priority": rng.randint(0, 255)}) for i in range(args.tasks)], concurrency=32)
        log(args, f"aging {'on' if aging else 'off'}: {args.tasks} tasks queued in {time.perf_counter() - t0:.1f}s")
        worker = Worker(q, concurrency=args.concurrency,
                        aging=AgingSettings(step_seconds=args.aging_step_seconds) if aging else False)
        started: list[int] = []

        @worker.handler(TASK_TYPE)
        async def sleep(payload: Any, ctx: Any) -> None:
            started.append(ctx.task.priority)
            await asyncio.sleep(args.task_seconds)

        submitted = args.tasks
        stop = asyncio.Event()

        async def produce() -> None:  # keep the backlog at args.tasks
            nonlocal submitted
            while not stop.is_set():
                missing = args.tasks - (submitted - worker.stats["completed"])
                if missing > 0:
                    await producer_q.submit_many(
                        [(TASK_TYPE, {"i": submitted + i}, {"priority": rng.randint(0, 255)}) for i in range(missing)],
                        concurrency=32)
                    submitted += missing
                with_timeout = asyncio.create_task(stop.wait())
                await asyncio.wait([with_timeout], timeout=0.5)
                with_timeout.cancel()

        await counter.list(f"{QUEUE}/workers/", limit=1)  # open the connection
        counter.reset()
        load_before = load_average()
        run = asyncio.create_task(worker.run())
        producer = asyncio.create_task(produce())
        start = time.monotonic()
        next_report = start + 30
        while time.monotonic() - start < args.seconds:
            await asyncio.sleep(min(1.0, args.seconds - (time.monotonic() - start)))
            if time.monotonic() >= next_report:
                next_report += 30
                log(args, f"aging {'on' if aging else 'off'}: {time.monotonic() - start:.0f}s, "
                          f"{worker.stats['completed']} completed, {sum(counter.counts().values())} requests")
        counts = counter.counts()  # the window only, not the shutdown
        completed = worker.stats["completed"]
        aged = worker.stats["aged"]
        stop.set()
        await producer
        worker.stop()
        await asyncio.wait_for(run, 120)
        if completed == 0:
            raise BenchError("no task completed")
        rpt = per_task(counts, completed)
        return {
            "aging": "on" if aging else "off", "seconds": args.seconds, "backlog": args.tasks,
            "concurrency": args.concurrency, "task_seconds": args.task_seconds,
            "latency_ms": args.latency_ms, "completed": completed,
            "requests_per_completed_task": rpt["total"], "by_op": rpt["by_op"], "counts": counts,
            "markers_moved": aged, "aging_step_seconds": args.aging_step_seconds, "submitted": submitted,
            "loadavg_1m": {"start": load_before, "end": load_average()},
        }
    finally:
        await q.close()
        await producer_q.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="qo backlog benchmark: what aging costs per completed task.")
    p.add_argument("--seconds", type=float, default=300.0, help="measured window per mode")
    p.add_argument("--tasks", type=int, default=2000, help="the backlog kept queued")
    p.add_argument("--concurrency", type=int, default=32, help="slots of the one worker")
    p.add_argument("--task-seconds", type=float, default=2.0, help="each task sleeps this long")
    p.add_argument("--latency-ms", type=float, default=25.0, help="added by the S3 server to every request")
    p.add_argument("--aging-step-seconds", type=float, default=60.0,
                   help="aging's step_seconds (default 60, the default setting); smaller compresses time "
                        "for a short run, e.g. 15 with --seconds 75 ages like 60 with 300")
    p.add_argument("--modes", default="off,on", help="comma-separated: off, on (in this order)")
    p.add_argument("--json-only", action="store_true")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("off", "on") for m in args.modes):
        p.error("--modes takes off and/or on")
    if args.tasks < 1 or args.seconds <= 0 or args.concurrency < 1:
        p.error("--tasks, --seconds and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("QO_AGING", "QO_AGING_STEP_SECONDS", "QO_AGING_STEP_LEVELS", "QO_AGING_CAP", "QO_AGING_INTERVAL"):
        os.environ.pop(name, None)
    server = S3Server(args.latency_ms)
    log(args, f"starting the moto S3 server ({args.latency_ms:g} ms per request)")
    server.start()
    try:
        results = []
        for mode in args.modes:
            url = server.url(f"backlog-{mode}-{uuid.uuid4().hex[:8]}")
            result = asyncio.run(run_mode(url, mode == "on", args))
            results.append(result)
            print(json.dumps(result), flush=True)
        if len(results) == 2:
            off, on = results
            log(args, f"requests per completed task: off {off['requests_per_completed_task']}, "
                      f"on {on['requests_per_completed_task']} "
                      f"({100 * (on['requests_per_completed_task'] / off['requests_per_completed_task'] - 1):+.1f}%)")
    except BenchError as exc:
        print(f"backlog: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
