"""qo's benchmark: submit N noop tasks, drain them with W worker processes, count requests.

    python benchmarks/bench.py --backend local|sqlite|s3|azure|both|all --tasks 1000 --workers 1 --concurrency 32
        [--latency-ms MS] [--idle-seconds 10] [--trickle-tasks 20] [--json-only]
        [--priorities uniform|mixed] [--bulk] [--shards P] [--slowdown-rate N [--slowdown-depth 3]]

Prints one JSON object per backend run (see benchmarks/README.md for every figure).
Progress goes to stderr; ``--json-only`` silences it.

- s3: a moto server (benchmarks/s3_server.py) in a subprocess on a free loopback port,
  adding ``--latency-ms`` (default 25) to every request, for every worker process; with
  ``--slowdown-rate N`` it answers ``503 SlowDown`` above N requests/s per prefix.
- azure: Azurite (qo-azure's ``qo_azure.testing.Azurite``, the Azure Storage emulator)
  on a free loopback port, a fresh container; ``--latency-ms`` (default 25) is added in
  each process by ``qo.counting.LatencyStorage`` (Azurite has no latency option).
- local: a fresh temporary directory; ``--latency-ms`` (default 0) is added in each
  process by ``qo.counting.LatencyStorage``. sqlite: the same, with the one-file local
  store (``sqlite://`` + a file in that directory).

Requests are counted by ``qo.counting.CountingStorage`` in every process (the submitter's
counts are the submit part, the workers' summed counts the drain part); the S3 server
counts them too, and on azure the backend counts the HTTP responses it receives, as
cross-checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from typing import Any
from urllib.parse import quote

import qo
from qo.clock import SystemClock
from qo.counting import OPS, CountingStorage, LatencyStorage
from qo.testing.processes import stop_process

QUEUE = "bench"
TASK_TYPE = "noop"
HERE = os.path.dirname(os.path.abspath(__file__))
#: --priorities mixed: each task's priority drawn (fixed seed) from these levels
PRIORITY_MIX = (0, 64, 128, 192, 255)
#: a worker waits this long for the submit to end (the parent terminates it on failure)
GO_WAIT_SECONDS = 6 * 3600.0

# moto accepts any credentials; spawned workers inherit these.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


class BenchError(RuntimeError):
    """A run that cannot give a figure (stuck drain, worker crash, lost tasks)."""


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.json_only:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def http_requests(storage: Any) -> int | None:
    """The HTTP requests the backend under the wrappers counted (qo-azure does), if any."""
    while storage is not None:
        count = getattr(storage, "http_requests", None)
        if isinstance(count, int):
            return count
        storage = getattr(storage, "inner", None)
    return None


def wrapper(latency_s: float):
    """``wrap_storage`` for connect: latency (local only) inside, counting outside."""
    if latency_s:
        return lambda storage: CountingStorage(LatencyStorage(storage, latency_s))
    return CountingStorage


def local_clock() -> SystemClock:
    """Every process and the S3 server share this machine's clock: use it as is.

    (The S3 storage otherwise estimates the server's clock from Date headers, which have
    1-second resolution: fine for 30 s leases, too coarse for sub-second latencies.)
    """
    return SystemClock(None)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    s = sorted(values)

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"p50": round(q(0.50) * 1000, 1), "p95": round(q(0.95) * 1000, 1)}


def add_counts(*parts: dict[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for p in parts:
        total.update(p)
    return dict(total)


def per_task(counts: dict[str, int], n: int) -> dict[str, Any]:
    by_op = {op: round(counts.get(op, 0) / n, 3) for op in OPS}
    by_op.update({op: round(c / n, 3) for op, c in counts.items() if op not in by_op})
    return {"total": round(sum(counts.values()) / n, 3), "by_op": by_op}


def filesystem_of(path: str) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts), e.g. ``ext4``, ``tmpfs``."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every figure."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- the S3 server ----------------------------------------------------------------


class S3Server:
    """benchmarks/s3_server.py in a subprocess; stopped by its own pid."""

    def __init__(self, latency_ms: float, slowdown_rate: float | None = None, slowdown_depth: int = 3):
        self.latency_ms = latency_ms
        self.slowdown = (["--slowdown-rate", str(slowdown_rate), "--slowdown-depth", str(slowdown_depth)]
                         if slowdown_rate else [])
        self.proc: subprocess.Popen | None = None
        self.endpoint_url = ""
        self.bucket = "qo-bench"

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "s3_server.py"), "--port", "0",
             "--latency-ms", str(self.latency_ms), "--bucket", self.bucket, *self.slowdown],
            stdout=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.strip().startswith("{") or self.proc.poll() is not None:
                break
        if not line.strip().startswith("{"):
            self.stop()
            raise BenchError("the moto S3 server did not start (see its stderr above)")
        self.endpoint_url = json.loads(line)["endpoint_url"]

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}?endpoint_url={quote(self.endpoint_url, safe='')}&region=us-east-1"

    def partitions(self) -> dict[str, dict[str, int]]:
        """The throttle's requests, SlowDowns and peak per partition prefix."""
        with urllib.request.urlopen(f"{self.endpoint_url}/__partitions", timeout=10) as r:
            return json.loads(r.read())

    def stats(self, reset: bool = False) -> dict[str, int]:
        req = urllib.request.Request(f"{self.endpoint_url}/__stats", method="POST" if reset else "GET")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)


# -- one worker process -------------------------------------------------------------


def worker_process(index: int, url: str, concurrency: int, latency_s: float, timeout: float,
                   go: Any, ready: Any, results: Any) -> None:
    """Connect (counted), warm the connection, wait for ``go``, drain until idle, report."""
    try:
        out = asyncio.run(_worker_main(index, url, concurrency, latency_s, timeout, go, ready))
    except BenchError as exc:
        out = {"index": index, "error": str(exc), "stuck": True}
    except BaseException as exc:  # report, never hang the parent
        out = {"index": index, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    results.put(out)


class _Completions:
    """A qo_task_event plugin: the time of the last completion this process stored."""

    def __init__(self) -> None:
        self.last = 0.0
        self.count = 0

    @qo.hookimpl
    def qo_task_event(self, event: str, task: Any) -> None:
        if event == "succeeded":
            self.last = time.time()
            self.count += 1


async def _worker_main(index: int, url: str, concurrency: int, latency_s: float, timeout: float,
                       go: Any, ready: Any) -> dict[str, Any]:
    from qo.plugins import get_plugins
    from qo.worker import Worker

    completions = _Completions()
    get_plugins().register(completions, name="qo-bench-completions")
    q = await qo.connect(url, queue=QUEUE, wrap_storage=wrapper(latency_s), clock=local_clock())
    counter = q.backend
    assert isinstance(counter, CountingStorage)
    waits: list[float] = []
    starts: list[tuple[float, int]] = []  # (start time, priority): the start order by level
    worker = Worker(q, concurrency=concurrency)

    @worker.handler(TASK_TYPE)
    async def noop(payload: Any, ctx: Any) -> None:
        waits.append(time.time() - ctx.task.created_at)
        starts.append((time.time(), ctx.task.priority))

    try:
        await counter.list(f"{QUEUE}/workers/", limit=1)  # open the connection before timing
        counter.reset()
        http_before = http_requests(counter)
        ready.put(index)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, go.wait, GO_WAIT_SECONDS):
            raise BenchError("never told to start")
        started = time.time()
        try:
            stats = await asyncio.wait_for(worker.run(until_idle=True), timeout)
        except TimeoutError:
            raise BenchError(f"worker {index} had not gone idle after {timeout:.0f}s") from None
        ended = time.time()
        http_after = http_requests(counter)
        return {
            "index": index,
            "http_requests": None if http_before is None else http_after - http_before,
            "counts": counter.counts(),
            "failures": counter.failures(),
            "stats": dict(stats),
            "waits": waits,
            "starts": starts,
            "started": started,
            "last_completion": completions.last,
            "ended": ended,
        }
    finally:
        await q.close()


# -- one backend run ----------------------------------------------------------------


async def submit(url: str, n: int, latency_s: float, before: Any = None,
                 priorities: str = "uniform", bulk: bool = False) -> tuple[float, dict[str, int], dict[str, int], int | None]:
    q = await qo.connect(url, queue=QUEUE, wrap_storage=wrapper(latency_s), clock=local_clock())
    counter = q.backend
    assert isinstance(counter, CountingStorage)
    try:
        await counter.list(f"{QUEUE}/ready/", limit=1)  # open the connection before timing
        counter.reset()
        http_before = http_requests(counter)
        if before is not None:
            before()
        t0 = time.perf_counter()
        if priorities == "mixed":
            rng = random.Random(6)
            items = [(TASK_TYPE, {"i": i}, {"priority": rng.choice(PRIORITY_MIX)}) for i in range(n)]
        else:
            items = [(TASK_TYPE, {"i": i}) for i in range(n)]
        await q.submit_many(items, concurrency=32, bulk=bulk)
        elapsed = time.perf_counter() - t0
        http_after = http_requests(counter)
        http = None if http_before is None or http_after is None else http_after - http_before
        return elapsed, counter.counts(), counter.failures(), http
    finally:
        await q.close()


async def lay_out(url: str, shards: int) -> None:
    """Spread the benchmark queue's keys over ``shards`` prefixes (docs/architecture.md §5l)."""
    q = await qo.connect(url, queue=QUEUE)
    try:
        await q.set_layout(shards)
    finally:
        await q.close()


async def status_counts(url: str) -> dict[str, int]:
    """Every task's status, read without the counting wrapper."""
    q = await qo.connect(url, queue=QUEUE, clock=local_clock())
    try:
        seen: Counter[str] = Counter()
        async for task in q.list(limit=None):
            seen[task.status] += 1
        return dict(seen)
    finally:
        await q.close()


async def idle_requests(url: str, seconds: float, concurrency: int, latency_s: float) -> dict[str, Any]:
    """One worker with default poll settings on the empty queue: requests in ``seconds``."""
    from qo.worker import Worker

    q = await qo.connect(url, queue=QUEUE, wrap_storage=wrapper(latency_s), clock=local_clock())
    counter = q.backend
    assert isinstance(counter, CountingStorage)
    worker = Worker(q, concurrency=concurrency)
    worker.handler(TASK_TYPE)(lambda payload: None)
    try:
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(seconds)
        counts = counter.counts()  # the window only, not the shutdown
        worker.stop()
        await asyncio.wait_for(run, 60)
    finally:
        await q.close()
    return {"per_minute": round(sum(counts.values()) * 60 / seconds, 1), "counts": counts}


async def trickle_latency(url: str, n: int, interval: float, concurrency: int, latency_s: float) -> list[float]:
    """One worker running, tasks submitted one at a time: submit-to-start of each."""
    from qo.worker import Worker

    q = await qo.connect(url, queue=QUEUE, wrap_storage=wrapper(latency_s), clock=local_clock())
    worker = Worker(q, concurrency=concurrency)
    waits: list[float] = []
    done = asyncio.Event()

    @worker.handler(TASK_TYPE)
    async def noop(payload: Any, ctx: Any) -> None:
        waits.append(time.time() - ctx.task.created_at)
        if len(waits) >= n:
            done.set()

    try:
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(1.0)  # past start-up: the worker polls at its idle back-off
        for i in range(n):
            await q.submit(TASK_TYPE, {"trickle": i})
            await asyncio.sleep(interval)
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            raise BenchError(f"trickle: only {len(waits)} of {n} tasks started within 60 s") from None
        worker.stop()
        await asyncio.wait_for(run, 60)
    finally:
        await q.close()
    return waits


LOCAL = ("local", "sqlite")  # the stores in a temporary directory (--tmpdir)


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    n, w, c = args.tasks, args.workers, args.concurrency
    latency_ms = args.latency_ms if args.latency_ms is not None else (0.0 if backend in LOCAL else 25.0)
    server: S3Server | None = None
    azurite: Any = None
    tmp: str | None = None
    result: dict[str, Any] = {"backend": backend, "tasks": n, "workers": w, "concurrency": c,
                              "priorities": args.priorities, "bulk": args.bulk,
                              "latency_ms": latency_ms, "plugins_outside_qo": optional_plugins()}
    load_before = load_average()
    if backend == "s3":
        client_latency = 0.0  # the server adds it, for every process
        server = S3Server(latency_ms, args.slowdown_rate, args.slowdown_depth)
        throttling = (f", 503 SlowDown above {args.slowdown_rate:g} requests/s per prefix"
                      if args.slowdown_rate else "")
        log(args, f"s3: starting moto server ({latency_ms:g} ms per request{throttling})")
        result["slowdown_rate"] = args.slowdown_rate
        server.start()
        url = server.url(f"bench-{uuid.uuid4().hex[:8]}")
        result["latency_injection"] = "server (moto, every request)"
    elif backend == "azure":
        client_latency = latency_ms / 1000
        azurite = start_azurite(args)
        url = azurite.new_container(prefix=f"bench-{uuid.uuid4().hex[:8]}")
        result["latency_injection"] = "LatencyStorage (client side, every call)" if latency_ms else "none"
    else:
        client_latency = latency_ms / 1000
        tmp = tempfile.mkdtemp(prefix="qo-bench-", dir=args.tmpdir)
        url = os.path.join(tmp, "store") if backend == "local" else "sqlite://" + os.path.join(tmp, "store.db")
        result["filesystem"] = filesystem_of(tmp)
        result["latency_injection"] = "LatencyStorage (client side, every request)" if latency_ms else "none"

    if args.shards > 1:  # before any worker opens the queue (each reads the layout once)
        asyncio.run(lay_out(url, args.shards))
        result["shards"] = args.shards

    ctx = mp.get_context("spawn")
    go, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker_process, name=f"qo-bench-worker-{i}",
                         args=(i, url, c, client_latency, args.drain_timeout, go, ready, results))
             for i in range(w)]
    try:
        log(args, f"{backend}: starting {w} worker process(es)")
        for p in procs:
            p.start()
        for _ in range(w):
            try:
                ready.get(timeout=120)
            except queue_mod.Empty:
                raise BenchError("worker processes did not start within 120 s") from None

        # submit
        log(args, f"{backend}: submitting {n} tasks")
        reset_server = (lambda: server.stats(reset=True)) if server else None
        submit_s, submit_counts, submit_failures, submit_http = asyncio.run(
            submit(url, n, client_latency, reset_server, args.priorities, args.bulk))
        server_submit = server.stats(reset=True) if server else None
        result["submit_tasks_per_s"] = round(n / submit_s, 1)

        # drain
        log(args, f"{backend}: draining with {w} x {c} slots")
        t_go = time.time()
        go.set()
        outs: list[dict[str, Any]] = []
        deadline = time.monotonic() + args.drain_timeout + 30
        while len(outs) < w:
            try:
                out = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_mod.Empty:
                raise BenchError(
                    f"drain stuck: {len(outs)} of {w} workers finished within {args.drain_timeout:.0f}s "
                    f"(raise --drain-timeout, or look for a worker that never goes idle)") from None
            if out.get("stuck"):
                raise BenchError(f"drain stuck: {out['error']} (--drain-timeout); task statuses now: "
                                 f"{asyncio.run(status_counts(url))}")
            if out.get("error"):
                raise BenchError(f"worker {out['index']} failed:\n{out['error']}")
            outs.append(out)
        for p in procs:
            p.join(30)
        server_drain = server.stats(reset=True) if server else None
        last = max(o["last_completion"] for o in outs)
        if last <= 0:
            raise BenchError("no task completed")
        result["drain_tasks_per_s"] = round(n / (last - t_go), 1)
        result["drain_wall_s"] = round(max(o["ended"] for o in outs) - t_go, 2)
        waits = [x for o in outs for x in o["waits"]]
        result["latency_submit_to_start_ms"] = percentiles(waits)
        if args.priorities == "mixed":  # 0 = started first, 1 = started last
            order = sorted(x for o in outs for x in o["starts"])
            ranks: dict[int, list[int]] = {}
            for rank, (_, prio) in enumerate(order):
                ranks.setdefault(prio, []).append(rank)
            result["median_start_position_by_priority"] = {
                str(p): round(sorted(r)[len(r) // 2] / max(1, len(order) - 1), 3) for p, r in sorted(ranks.items())}

        drain_counts = add_counts(*(o["counts"] for o in outs))
        total = add_counts(submit_counts, drain_counts)
        rpt = per_task(total, n)
        rpt["submit"] = per_task(submit_counts, n)
        rpt["drain"] = per_task(drain_counts, n)
        result["requests_per_task"] = rpt
        failures = add_counts(submit_failures, *(o["failures"] for o in outs))
        result["failed_requests"] = failures
        result["worker_stats"] = add_counts(*(o["stats"] for o in outs))
        result["tasks_per_worker"] = [len(o["waits"]) for o in sorted(outs, key=lambda o: o["index"])]
        if submit_http is not None and all(o.get("http_requests") is not None for o in outs):
            drain_http = sum(o["http_requests"] for o in outs)
            result["backend_counted_http_requests"] = {
                "submit": submit_http, "drain": drain_http, "client_counted": sum(total.values()),
                "per_task": round((submit_http + drain_http) / n, 3),
            }
        if server_submit is not None and server_drain is not None:
            slowdowns = {"submit": server_submit.pop("SLOWDOWN", 0), "drain": server_drain.pop("SLOWDOWN", 0)}
            result["server_counted_requests"] = {
                "submit": sum(server_submit.values()), "drain": sum(server_drain.values()),
                "client_counted": sum(total.values()), "drain_by_op": server_drain,
            }
            if args.slowdown_rate:  # refused requests, already inside the counts above
                result["server_slowdowns"] = slowdowns
                parts = server.partitions()  # the whole run's, the most refused first
                result["server_slowdowns_by_prefix"] = {
                    name.split("/", 1)[1]: v for name, v in sorted(parts.items(), key=lambda kv: -kv[1]["slowdowns"])[:12]}

        # verify, uncounted
        statuses = asyncio.run(status_counts(url))
        result["statuses"] = statuses
        result["completed"] = statuses.get("completed", 0)
        result["all_completed"] = statuses == {"completed": n} and len(waits) == n
        if server:
            server.stats(reset=True)

        # idle polling
        if args.idle_seconds > 0:
            log(args, f"{backend}: idle worker for {args.idle_seconds:g}s")
            idle = asyncio.run(idle_requests(url, args.idle_seconds, c, client_latency))
            result["idle_requests_per_worker_per_minute"] = idle["per_minute"]
            result["idle_counts"] = idle["counts"]
            result["idle_seconds"] = args.idle_seconds
        else:
            result["idle_requests_per_worker_per_minute"] = None

        # pickup latency with tasks arriving one at a time
        if args.trickle_tasks > 0:
            log(args, f"{backend}: trickle of {args.trickle_tasks} tasks, one per {args.trickle_interval:g}s")
            tw = asyncio.run(trickle_latency(url, args.trickle_tasks, args.trickle_interval, c, client_latency))
            result["latency_trickle_submit_to_start_ms"] = percentiles(tw)
        result["host"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "loadavg_1m": {"start": load_before, "end": load_average()}}
        return result
    finally:
        for p in procs:  # only after a failure are any still alive: stop them
            if p.is_alive():
                p.join(1)
            if p.is_alive():
                p.terminate()
                p.join(5)
        if server:
            server.stop()
        if azurite is not None:
            azurite.stop()
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def start_azurite(args: argparse.Namespace) -> Any:
    """Azurite on a free loopback port, its connection string exported for the workers."""
    try:
        from qo_azure.testing import MISSING, Azurite, find_azurite
    except ImportError:
        raise BenchError("--backend azure needs plugins/qo-azure: pip install -e plugins/qo-azure") from None
    if find_azurite() is None:
        raise BenchError(MISSING)
    log(args, "azure: starting Azurite")
    server = Azurite()
    server.start()
    server.export_env()  # spawned workers inherit AZURE_STORAGE_CONNECTION_STRING
    return server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="qo benchmark: submit N noop tasks, drain with W worker processes.")
    p.add_argument("--backend", choices=("local", "sqlite", "s3", "azure", "both", "all"), default="both",
                   help="both: local then s3; all: local, s3, then azure (Azurite); sqlite: the one-file local store")
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--bulk", action="store_true",
                   help="submit through submit_many's bulk path (packs of up to 256 tasks); default: one object per task")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--concurrency", type=int, default=32, help="slots per worker")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="per-request latency (default: 25 for s3 and azure, 0 for local)")
    p.add_argument("--idle-seconds", type=float, default=10.0,
                   help="measure an idle worker's requests for this long (0: skip)")
    p.add_argument("--trickle-tasks", type=int, default=20,
                   help="pickup latency: tasks submitted one at a time to a running worker (0: skip)")
    p.add_argument("--trickle-interval", type=float, default=0.25, help="seconds between trickle tasks")
    p.add_argument("--drain-timeout", type=float, default=600.0, help="seconds before a drain counts as stuck")
    p.add_argument("--tmpdir", default=None, help="parent directory of the local store (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the local store directory")
    p.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    p.add_argument("--priorities", choices=("uniform", "mixed"), default="uniform",
                   help="uniform: every task at 128; mixed: drawn from 0/64/128/192/255 (fixed seed)")
    p.add_argument("--shards", type=int, default=1,
                   help="lay the queue out in this many shards per kind of key (qo layout set --shards)")
    p.add_argument("--slowdown-rate", type=float, default=None,
                   help="s3: the server answers 503 SlowDown above N requests/s per prefix (default: never)")
    p.add_argument("--slowdown-depth", type=int, default=3,
                   help="s3: a prefix is the key up to its Nth '/' (default 3: bench-x/{queue}/{kind}/)")
    p.add_argument("--core", action="store_true",
                   help="load only qo's own plugins and storage backends (QO_DISABLE_PLUGINS for the rest, "
                        "e.g. qo-metrics): qo as `pip install qo` runs it, beside peers that run bare")
    args = p.parse_args(argv)
    if args.slowdown_rate is not None and args.slowdown_rate <= 0:
        p.error("--slowdown-rate must be > 0")
    if args.tasks < 1 or args.workers < 1 or not 1 <= args.concurrency <= 1024:
        p.error("--tasks and --workers must be >= 1, --concurrency 1..1024")
    if args.idle_seconds < 0 or args.trickle_tasks < 0 or args.trickle_interval < 0:
        p.error("--idle-seconds, --trickle-tasks and --trickle-interval must be >= 0")
    return args


def core_only() -> None:
    """Block every plugin outside qo's own distribution but the storage backends, for
    this process and the workers it starts (they inherit the environment)."""
    from qo.plugins import disabled_from_env, get_plugins, reset_plugins

    extra = {i.name for i in get_plugins().all_info()
             if i.distribution != "qo-queue" and "qo_storage" not in i.hooks}
    os.environ["QO_DISABLE_PLUGINS"] = ",".join(sorted(extra | disabled_from_env()))
    reset_plugins()


def optional_plugins() -> list[str]:
    """The plugins loaded from outside qo's own distribution (they may cost per task)."""
    from qo.plugins import get_plugins

    return sorted(f"{i.name} ({i.distribution})" for i in get_plugins().all_info()
                  if i.status == "loaded" and i.distribution != "qo-queue")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.core:
        core_only()
    backends = {"both": ["local", "s3"], "all": ["local", "s3", "azure"]}.get(args.backend, [args.backend])
    status = 0
    for backend in backends:
        try:
            result = run_backend(backend, args)
        except BenchError as exc:
            print(f"bench: {backend}: {exc}", file=sys.stderr, flush=True)
            status = 2
            continue
        print(json.dumps(result), flush=True)
        if not result["all_completed"]:
            print(f"bench: {backend}: not every task completed: {result['statuses']}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
