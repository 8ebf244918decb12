"""What the sync API adds per call: qo.SyncQueue against the async Queue, same backend.

    python benchmarks/sync_overhead.py [--url memory://bench | --moto] [--calls 2000]

On ``memory://`` (qo-memory: no I/O) the difference is the hand-off to the SyncQueue's
loop thread and back; on any backend the requests are counted and must be equal. Also
times ``asyncio.run(connect + submit)``, what a sync caller does without the sync API.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import qo
from qo.counting import CountingStorage


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="memory://sync-bench")
    p.add_argument("--moto", action="store_true", help="on a moto S3 server started here (loopback)")
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    if args.moto:
        import os

        from qo.testing.moto import MotoServer

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(name, "testing")
        server = MotoServer()
        server.start()
        args.url = server.url("sync-bench")
    n = args.calls

    async def async_side() -> tuple[list[float], list[float], dict]:
        q = await qo.connect(args.url, queue="async", wrap_storage=CountingStorage)
        submits, gets = [], []
        for i in range(n):
            t0 = time.perf_counter()
            t = await q.submit("bench", {"i": i})
            t1 = time.perf_counter()
            await q.get(t.id)
            gets.append(time.perf_counter() - t1)
            submits.append(t1 - t0)
        counts = q.storage.counts()
        await q.close()
        return submits, gets, counts

    a_submit, a_get, a_counts = asyncio.run(async_side())
    with qo.connect_sync(args.url, queue="sync", wrap_storage=CountingStorage) as q:
        s_submit, s_get = [], []
        for i in range(n):
            t0 = time.perf_counter()
            t = q.submit("bench", {"i": i})
            t1 = time.perf_counter()
            q.get(t.id)
            s_get.append(time.perf_counter() - t1)
            s_submit.append(t1 - t0)
        s_counts = q.storage.counts()

    async def one_off() -> None:
        q = await qo.connect(args.url, queue="oneoff")
        try:
            await q.submit("bench", {})
        finally:
            await q.close()

    runs = []
    for _ in range(min(n, 50)):
        t0 = time.perf_counter()
        asyncio.run(one_off())
        runs.append(time.perf_counter() - t0)

    def us(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e6:8.1f} us"

    print(f"{args.url}, {n} calls each (medians)")
    print(f"  submit  async {us(a_submit)}   sync {us(s_submit)}   overhead {(statistics.median(s_submit) - statistics.median(a_submit)) * 1e6:7.1f} us")
    print(f"  get     async {us(a_get)}   sync {us(s_get)}   overhead {(statistics.median(s_get) - statistics.median(a_get)) * 1e6:7.1f} us")
    print(f"  asyncio.run(connect + submit + close) per call: {us(runs)}")
    print(f"  requests async {a_counts}  sync {s_counts}  equal: {a_counts == s_counts}")
    return 0 if a_counts == s_counts else 1


if __name__ == "__main__":
    sys.exit(main())
