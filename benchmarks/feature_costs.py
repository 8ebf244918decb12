"""Storage requests that features add, counted on local and on a moto S3 server.

    python benchmarks/feature_costs.py [--tasks 200] [--backend local|s3|both]

Prints one JSON object per backend: requests per submit with and without an
idempotency key (and for a duplicate), per dependency edge (submit + release + run),
and per task with an active rate limit, each split by operation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import uuid

import qo
from qo.counting import CountingStorage


async def counted(url: str, queue: str):
    return await qo.connect(url, queue=queue, wrap_storage=CountingStorage)


def per(counts: dict, n: int) -> dict:
    ops = {k: round(v / n, 3) for k, v in sorted(counts.items()) if v}
    return {"total": round(sum(counts.values()) / n, 3), "by_op": ops}


async def drain(q, types=("t",)) -> None:
    worker = qo.Worker(q, concurrency=16, poll_min=0.01, poll_max=0.05)
    for t in types:
        worker.handler(t)(lambda input: input)
    await worker.run(until_idle=True)


async def measure(url: str, n: int) -> dict:
    out: dict = {}
    q = await counted(url, "plain")
    await q.submit_many([("t", i) for i in range(n)])
    out["submit_without_key"] = per(q.storage.counts(), n)
    await q.close()

    q = await counted(url, "keyed")
    await q.submit_many([("t", i, {"idempotency_key": f"k{i}"}) for i in range(n)])
    out["submit_with_new_key"] = per(q.storage.counts(), n)
    q.storage.reset()
    await q.submit_many([("t", i, {"idempotency_key": f"k{i}"}) for i in range(n)])
    out["submit_duplicate_key"] = per(q.storage.counts(), n)
    await q.close()

    # dependencies: n children of one parent, then a chain: requests per edge beyond the
    # same tasks without dependencies (submit + drain)
    q = await counted(url, "nodeps")
    await q.submit_many([("t", i) for i in range(n + 1)])
    await drain(q)
    base = sum(q.storage.counts().values())
    await q.close()
    q = await counted(url, "deps")
    parent = await q.submit("t", "parent")
    await q.submit_many([("t", i, {"depends_on": [parent.id]}) for i in range(n)])
    await drain(q)
    total = sum(q.storage.counts().values())
    out["per_dependency_edge_extra"] = round((total - base) / n, 3)
    await q.close()

    # an active rate limit that never refuses (rate far above the drain)
    q = await counted(url, "nolimit")
    await q.submit_many([("t", i) for i in range(n)])
    await drain(q)
    base_counts = q.storage.counts()
    await q.close()
    q = await counted(url, "limited")
    await q.limits.set("task_type:t", rate=100000, per=1.0, burst=100000)
    await q.submit_many([("t", i) for i in range(n)])
    await drain(q)
    lim_counts = q.storage.counts()
    await q.close()
    out["per_task_with_limit_extra"] = round((sum(lim_counts.values()) - sum(base_counts.values())) / n, 3)
    out["per_task_with_limit_extra_by_op"] = {
        k: round((lim_counts.get(k, 0) - base_counts.get(k, 0)) / n, 3) for k in sorted(set(lim_counts) | set(base_counts))
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--backend", choices=["local", "s3", "both"], default="both")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    if args.backend in ("local", "both"):
        root = tempfile.mkdtemp(prefix="qo-costs-")
        try:
            print(json.dumps({"backend": "local", "tasks": args.tasks, **asyncio.run(measure(root, args.tasks))}))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if args.backend in ("s3", "both"):
        from qo.testing.moto import MotoServer

        with MotoServer() as server:
            url = server.new_bucket(f"costs-{uuid.uuid4().hex[:6]}")
            print(json.dumps({"backend": "s3", "tasks": args.tasks, **asyncio.run(measure(url, args.tasks))}))


if __name__ == "__main__":
    main()
