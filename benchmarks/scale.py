"""Inspection and retention on a long history: the cost must follow the work asked for.

For each N (default 1,000 and 100,000) a fresh queue gets N completed tasks (written
straight into storage: the fast path the issue allows, the same objects a worker
leaves) and 5 failed ones (failed through a real worker, so their index entries are
the engine's own). Then, with every request counted:

- ``list --status failed`` (finds the 5),
- ``stats()``,
- ``purge --status failed --older-than 1d`` seen 8 days later (deletes the 5),
- a fresh worker's first task (submit one, a new worker runs it until idle).

    python benchmarks/scale.py [--backend local|s3] [--sizes 1000,100000] [--latency-ms 0]

Prints one JSON object per N; the N = 100,000 row must cost what the N = 1,000 row
costs, within 10 % (``ok``). S3 is a moto server on loopback (benchmarks/s3_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from urllib.parse import quote

import qo
from qo import keys
from qo.clock import FakeClock
from qo.counting import CountingStorage, LatencyStorage
from qo.model import COMPLETED, Task
from qo.worker import Worker

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
FAST = dict(poll_min=0.01, poll_max=0.1, sweep_interval=0.5, buffer_max_age=0.5)


def start_s3(bucket: str) -> tuple[subprocess.Popen, str]:
    """benchmarks/s3_server.py on a free port, with ``bucket``; its endpoint URL."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "s3_server.py"), "--port", "0", "--latency-ms", "0",
                             "--bucket", bucket], stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())["endpoint_url"]


async def build(url: str, queue: str, n: int, wrap) -> None:
    """N completed tasks written straight to storage, 5 failed through a worker."""
    q = await qo.connect(url, queue=queue, wrap_storage=wrap)
    now = q.clock.now()
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        t = Task(id=keys.new_task_id(), task_type="done", input=i, status=COMPLETED, attempt=1,
                 available_at=now, created_at=now, updated_at=now, started_at=now, finished_at=now, output=i)
        async with sem:
            await q.storage.put(keys.task(queue, t.id), t.to_json(), if_none_match=True)

    t0 = time.monotonic()
    for start in range(0, n, 5000):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 5000))))
        print(f"[scale] {queue}: {min(n, start + 5000)} of {n} written ({time.monotonic() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    for i in range(5):
        await q.submit("bad", i, max_retries=0)
    w = Worker(q, concurrency=8, **FAST)

    @w.handler("bad")
    def bad(input):
        raise qo.Fail("planted failure")

    await w.run(until_idle=True)
    await q.close()


async def measure(url: str, queue: str, wrap_latency) -> dict:
    counting: list[CountingStorage] = []

    def wrap(storage):
        counting.append(CountingStorage(wrap_latency(storage)))
        return counting[-1]

    async def counted(label: str, q: qo.Queue, coro) -> dict:
        c = q.backend
        c.reset()
        t0 = time.monotonic()
        result = await coro
        return {"op": label, "requests": c.total, "by_op": c.counts(), "seconds": round(time.monotonic() - t0, 3),
                "result": result}

    q = await qo.connect(url, queue=queue, wrap_storage=wrap)
    rows = []

    async def failed() -> int:
        return len([t async for t in q.list(status="failed")])

    rows.append(await counted("list --status failed", q, failed()))
    rows.append(await counted("stats", q, _stats(q)))
    later = await qo.connect(url, queue=queue, wrap_storage=wrap, clock=FakeClock(time.time() + 8 * 86400))
    rows.append(await counted("purge --status failed --older-than 1d (8 days later)", later,
                              later.purge("failed", 86400)))
    await later.close()

    waiter = await qo.connect(url, queue=queue)  # not counted: it only watches

    async def first_task() -> str:
        task = await q.submit("first", 1)
        w = Worker(q, concurrency=4)  # default polling: its loops follow time, not the history
        w.handler("first")(lambda input: input)
        run = asyncio.create_task(w.run())
        done = await waiter.wait(task.id, timeout=60)
        w.stop()
        await run
        return done.status

    rows.append(await counted("a fresh worker's first task (submit, start, run it, stop)", q, first_task()))
    await waiter.close()
    await q.close()
    return {"rows": rows}


async def _stats(q: qo.Queue) -> dict:
    s = await q.stats()
    return {"failed": s["counts"]["failed"], "pending": s["counts"]["pending"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["local", "s3"], default="local")
    p.add_argument("--sizes", default="1000,100000")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added to every measured request")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    server = None
    tmp = tempfile.mkdtemp(prefix="qo-scale-")
    try:
        if args.backend == "s3":
            bucket = f"scale-{uuid.uuid4().hex[:8]}"
            server, endpoint = start_s3(bucket)
            url = f"s3://{bucket}/scale?endpoint_url={quote(endpoint, safe='')}&region=us-east-1"
        else:
            url = os.path.join(tmp, "store")
        latency = args.latency_ms / 1000
        wrap_latency = (lambda s: LatencyStorage(s, latency)) if latency else (lambda s: s)
        out = []
        for n in sizes:
            name = f"n{n}"
            asyncio.run(build(url, name, n, None))
            result = asyncio.run(measure(url, name, wrap_latency))
            result.update(backend=args.backend, n=n, latency_ms=args.latency_ms)
            out.append(result)
            print(json.dumps(result, default=str), flush=True)
        if len(out) > 1:
            base = {r["op"]: r["requests"] for r in out[0]["rows"]}
            for other in out[1:]:
                worst = max(abs(r["requests"] - base[r["op"]]) / max(1, base[r["op"]]) for r in other["rows"])
                print(json.dumps({"compare": f"n={out[0]['n']} vs n={other['n']}", "worst_relative_difference":
                                  round(worst, 3), "ok": worst <= 0.10}), flush=True)
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
