"""The chaos driver: producers and workers as processes on one bucket, faults everywhere,
workers SIGKILLed at random and restarted; then a clean drain and the invariants.

Used by ``tests/test_chaos.py`` (small, both backends) and ``benchmarks/chaos.py`` (any
size). Module-level functions so that 'spawn' can pickle them.

Every producer writes one JSON line per submit call (``submits-<pid>.jsonl``): the kind,
the ``tag`` in the task's input, the ids it got back, or ``raised`` (then the task may
or may not exist: either is accepted). Every handler appends ``'<task id> <attempt>'``
to ``ran-<pid>.log``. Every process dumps its injected faults to ``faults-<pid>.json``.
"""

from __future__ import annotations

import asyncio
import collections
import glob
import json
import multiprocessing
import os
import random
import signal
import time
from typing import Any, Callable

QUEUE = "chaos"
TERMINAL = {"completed", "failed", "cancelled", "skipped"}
DEFAULT_FAULTS = dict(error_rate=0.05, landed_error_rate=0.02, lost_response_rate=0.02, latency=(0.0, 0.005))
TICK_CRON = "* * * * * */2"  # every 2 seconds (croniter: seconds last)


def worker_settings(**overrides):
    from qo.worker import WorkerSettings

    base = dict(concurrency=4, poll_min=0.01, poll_max=0.2, lease_ttl=3.0, sweep_interval=0.3,
                buffer_max_age=0.5, dependency_sweep_interval=1.0, shutdown_timeout=1.0,
                orphan_grace=10.0)
    base.update(overrides)
    return WorkerSettings(**base)


def _wrap(seed: int, faults: dict | None) -> Callable | None:
    if not faults:
        return None
    from qo.testing.faults import FaultyStorage

    return lambda s: FaultyStorage(s, seed=seed, **faults)


def _dump_faults(storage: Any, work_dir: str) -> None:
    injected = getattr(storage, "injected", None)
    if injected is None:
        return
    path = os.path.join(work_dir, f"faults-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(injected(), f)
    os.replace(path + ".tmp", path)


def register_handlers(worker: Any, log_path: str) -> None:
    import qo

    def note(line: str) -> None:
        with open(log_path, "a") as f:
            f.write(line + "\n")

    async def plain(input, ctx):
        note(f"{ctx.task.id} {ctx.attempt}")
        await asyncio.sleep(random.uniform(0, 0.05))
        return input

    async def flaky(input, ctx):
        note(f"{ctx.task.id} {ctx.attempt}")
        if ctx.attempt == 1:
            raise qo.Retry(0.2, "first attempts fail")
        return input

    async def chain(input, ctx):
        note(f"{ctx.task.id} {ctx.attempt}")
        for dep, info in ctx.dependencies.items():
            if info.get("status") != "completed":
                note(f"DEP {ctx.task.id} {dep} {info.get('status')}")
        await asyncio.sleep(random.uniform(0, 0.05))
        return input

    for t in ("plain", "idem", "tick"):
        worker.handler(t)(plain)
    worker.handler("flaky")(flaky)
    worker.handler("chain")(chain)


# -- processes ---------------------------------------------------------------------------


def run_worker(url: str, work_dir: str, seed: int, faults: dict | None) -> None:
    """A worker that runs until killed, under faults."""
    import qo
    from qo.worker import Worker

    async def main() -> None:
        q = await qo.connect(url, queue=QUEUE, wrap_storage=_wrap(seed, faults))
        worker = Worker(q, settings=worker_settings())
        register_handlers(worker, os.path.join(work_dir, f"ran-{os.getpid()}.log"))

        async def dump() -> None:
            while True:
                await asyncio.sleep(0.3)
                _dump_faults(q.storage, work_dir)

        dumper = asyncio.create_task(dump())
        try:
            await worker.run()
        finally:
            dumper.cancel()
            _dump_faults(q.storage, work_dir)

    asyncio.run(main())


def run_producer(url: str, work_dir: str, seed: int, faults: dict | None, seconds: float,
                 key_pool: int, with_scheduler: bool) -> None:
    """Submit a mix of work for ``seconds``; record every call."""
    import qo
    from qo.scheduler import Scheduler

    rng = random.Random(seed)
    out_path = os.path.join(work_dir, f"submits-{os.getpid()}.jsonl")

    async def main() -> None:
        q = await qo.connect(url, queue=QUEUE, wrap_storage=_wrap(seed, faults))
        stop = asyncio.Event()
        sched = asyncio.create_task(Scheduler(q, poll_max=0.5).run(stop)) if with_scheduler else None
        end = time.monotonic() + seconds
        i = 0
        with open(out_path, "a") as out:
            def record(**rec: Any) -> None:
                out.write(json.dumps(rec) + "\n")
                out.flush()

            while time.monotonic() < end:
                i += 1
                tag = f"{seed}-{i}"
                kind = rng.choices(["plain", "idem", "graph", "flaky"], weights=[4, 3, 1, 1])[0]
                try:
                    if kind == "plain":
                        t = await q.submit("plain", {"tag": tag}, max_retries=20)
                        record(kind=kind, tag=tag, ids=[t.id])
                    elif kind == "flaky":
                        t = await q.submit("flaky", {"tag": tag}, max_retries=20)
                        record(kind=kind, tag=tag, ids=[t.id])
                    elif kind == "idem":
                        tag = f"key-{rng.randrange(key_pool)}"  # shared by producers: collisions
                        t = await q.submit("idem", {"tag": tag}, idempotency_key=tag, max_retries=20)
                        record(kind=kind, tag=tag, ids=[t.id])
                    else:
                        nodes = {
                            "a": {"task_type": "chain", "input": {"tag": tag + "a"}, "max_retries": 20},
                            "b": {"task_type": "chain", "input": {"tag": tag + "b"}, "max_retries": 20,
                                  "depends_on": ["a"]},
                            "c": {"task_type": "chain", "input": {"tag": tag + "c"}, "max_retries": 20,
                                  "depends_on": ["a", "b"]},
                        }
                        got = await q.submit_graph(nodes)
                        record(kind=kind, tag=tag, ids=[got[n].id for n in "abc"])
                except qo.QoError as exc:
                    record(kind=kind, tag=tag, raised=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(rng.uniform(0, 0.03))
        stop.set()
        if sched is not None:
            await sched
        _dump_faults(q.storage, work_dir)
        await q.close()

    asyncio.run(main())


# -- the driver ---------------------------------------------------------------------------


def run_chaos(url: str, work_dir: str, *, seconds: float = 40.0, producers: int = 2, workers: int = 4,
              kill_every: tuple[float, float] = (0.5, 2.0), faults: dict | None = None, seed: int = 1,
              key_pool: int = 40, scheduler: bool = True, drain_timeout: float = 120.0,
              say: Callable[[str], None] = lambda s: None) -> dict:
    """Run the chaos, then drain cleanly and check; returns a report with ``problems``."""
    faults = DEFAULT_FAULTS if faults is None else faults
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random(seed)
    os.makedirs(work_dir, exist_ok=True)
    if scheduler:
        asyncio.run(_add_schedule(url))
    t0 = time.monotonic()
    n = 0

    def start_worker() -> multiprocessing.Process:
        nonlocal n
        n += 1
        p = ctx.Process(target=run_worker, args=(url, work_dir, seed * 1000 + n, faults), daemon=True)
        p.start()
        return p

    pool = [start_worker() for _ in range(workers)]
    prods = [ctx.Process(target=run_producer, daemon=True,
                         args=(url, work_dir, seed * 1000 + 500 + i, faults, seconds, key_pool,
                               scheduler and i < 2))
             for i in range(producers)]
    for p in prods:
        p.start()
    kills = 0
    try:
        while any(p.is_alive() for p in prods):
            time.sleep(rng.uniform(*kill_every))
            if not any(p.is_alive() for p in prods):
                break
            i = rng.randrange(len(pool))
            os.kill(pool[i].pid, signal.SIGKILL)
            pool[i].join(10)
            kills += 1
            pool[i] = start_worker()
        for p in prods:
            p.join(drain_timeout)
    finally:
        for p in pool + prods:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
    chaos_s = time.monotonic() - t0
    say(f"chaos over after {chaos_s:.1f}s: {kills} kills, {n} worker processes; draining")
    producer_codes = [p.exitcode for p in prods]
    t1 = time.monotonic()
    report = asyncio.run(_drain_and_check(url, work_dir, drain_timeout))
    report.update(chaos_seconds=round(chaos_s, 1), drain_seconds=round(time.monotonic() - t1, 1),
                  kills=kills, worker_processes=n, producer_exit_codes=producer_codes)
    if any(c != 0 for c in producer_codes):
        report["problems"].append(f"a producer exited with {producer_codes}")
    return report


async def _add_schedule(url: str) -> None:
    import qo

    q = await qo.connect(url, queue=QUEUE)
    await q.schedules.add("tick", cron=TICK_CRON, task_type="tick", input={"tag": "tick"}, max_retries=20)
    await q.close()


async def _bounded(worker: Any, timeout: float, problems: list[str], what: str) -> dict:
    """Run ``worker`` until idle; one that is not idle after ``timeout`` is a problem."""
    run = asyncio.create_task(worker.run(until_idle=True))
    done, _ = await asyncio.wait([run], timeout=timeout)
    if not done:
        problems.append(f"{what} was not idle after {timeout}s")
        worker.stop()
    return dict(await run)


async def _drain_and_check(url: str, work_dir: str, drain_timeout: float) -> dict:
    import qo
    from qo import keys
    from qo.worker import Worker

    q = await qo.connect(url, queue=QUEUE)
    if await q.storage.list(f"{QUEUE}/schedules/"):
        await q.schedules.remove("tick")
    clean = Worker(q, settings=worker_settings())
    register_handlers(clean, os.path.join(work_dir, f"ran-{os.getpid()}-clean.log"))
    problems: list[str] = []
    drain = await _bounded(clean, drain_timeout, problems, "the clean drain")
    second = Worker(q, settings=worker_settings())
    second_log = os.path.join(work_dir, "ran-second.log")
    register_handlers(second, second_log)
    again = await _bounded(second, 30.0, problems, "the second clean drain")

    tasks = {t.id: t async for t in q.list(limit=None)}
    by_status = collections.Counter(t.status for t in tasks.values())
    runs: collections.Counter[str] = collections.Counter()
    for path in glob.glob(os.path.join(work_dir, "ran-*.log")):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == "DEP":
                    problems.append(f"chain task {parts[1]} ran while its dependency {parts[2]} was {parts[3]}")
                elif len(parts) == 2 and len(parts[0]) == 24:
                    runs[parts[0]] += 1
    # what producers asked for
    submits, raised = collections.Counter(), collections.Counter()
    ok_tags: dict[str, set[str]] = collections.defaultdict(set)  # tag -> ids returned
    raised_tags: set[str] = set()
    for path in glob.glob(os.path.join(work_dir, "submits-*.jsonl")):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                kind = rec["kind"]
                tags = [rec["tag"] + n for n in "abc"] if kind == "graph" else [rec["tag"]]
                if "raised" in rec:
                    raised[kind] += 1
                    raised_tags.update(tags)
                else:
                    submits[kind] += 1
                    for tag, tid in zip(tags, rec["ids"]):
                        ok_tags[tag].add(tid)
    by_tag: dict[str, list[str]] = collections.defaultdict(list)
    for t in tasks.values():
        tag = t.input.get("tag") if isinstance(t.input, dict) else None
        by_tag[tag].append(t.id)
    for tag, ids in ok_tags.items():
        if len(ids) > 1:
            problems.append(f"{tag}: submits returned different tasks {sorted(ids)}")
        for tid in ids:
            if tid not in tasks:
                problems.append(f"{tag}: submit returned {tid}, which does not exist")
    for tag, ids in by_tag.items():
        if tag == "tick":
            continue
        if len(ids) > 1:
            problems.append(f"{tag}: {len(ids)} tasks {sorted(ids)} (a duplicate)")
        if tag not in ok_tags and tag not in raised_tags:
            problems.append(f"tasks {ids} with tag {tag!r} that nobody submitted")
    for t in tasks.values():
        if t.status not in TERMINAL:
            extra = ""
            if t.status == "blocked":
                parents = {p: tasks[p].status if p in tasks else "missing" for p in t.waiting_on}
                extra = f" waiting on {parents}"
            problems.append(f"task {t.id} ({t.task_type}) is {t.status} after the drain{extra}")
        elif t.status != "completed":
            problems.append(f"task {t.id} ({t.task_type}) ended {t.status}: {t.last_error}")
        if t.status == "completed" and not runs.get(t.id):
            problems.append(f"task {t.id} is completed but its handler never ran")
    for tid in runs:
        if tid not in tasks:
            problems.append(f"a handler ran task {tid}, which does not exist")
    # scheduled ticks: one task per fire time, each named by its idempotency record
    ticks = {tid for tid in by_tag.get("tick", [])}
    recorded = set()
    for e in await q.storage.list(f"{QUEUE}/idem/custom.schedule/"):
        recorded.add(json.loads((await q.storage.get(e.key)).data)["task_id"])
    if ticks - recorded:
        problems.append(f"tick tasks no fire record names (double fires): {sorted(ticks - recorded)}")
    # the second clean worker must have found nothing to do
    if again.get("claimed") or (os.path.exists(second_log) and os.path.getsize(second_log)):
        problems.append(f"the second clean drain still found work: {dict(again)}")
    leftover = collections.Counter()
    for prefix in (keys.ready_prefix(QUEUE), f"{QUEUE}/delayed/"):
        for e in await q.storage.list(prefix):
            m = keys.parse_marker(e.key) if hasattr(keys, "parse_marker") else None
            tid = m.task_id if m is not None else None
            leftover[tasks[tid].status if tid in tasks else "no task"] += 1
    faults = collections.Counter()
    for path in glob.glob(os.path.join(work_dir, "faults-*.json")):
        with open(path) as f:
            faults.update({k: v for k, v in json.load(f).items() if ":" not in k})
    await q.close()
    return dict(problems=problems, tasks=len(tasks), statuses=dict(by_status), submits=dict(submits),
                raised_submits=dict(raised), ticks=len(ticks), handler_runs=sum(runs.values()),
                ran_more_than_once=sum(1 for n in runs.values() if n > 1),
                drain=dict(drain), second_drain=dict(again), leftover_markers=dict(leftover),
                injected=dict(faults))
