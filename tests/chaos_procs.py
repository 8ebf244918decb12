"""The chaos driver: producers, workers and schedulers as processes on one bucket, faults
everywhere, workers and schedulers SIGKILLed at random and restarted, poison objects
planted while it runs; then a clean drain and the invariants.

Used by ``tests/test_chaos.py`` (small, both backends) and ``benchmarks/chaos.py`` (any
size). Module-level functions so that 'spawn' can pickle them.

What every process leaves in the work directory, for the checks:

- ``submits-<pid>.jsonl``: a producer's submit calls, one JSON line each: the kind, the
  ``tag`` in the task's input, the ids it got back, or ``raised`` (then the task may or
  may not exist: either is accepted).
- ``ran-<label>.log``: one line ``'<task id> <attempt> <time>'`` per handler run; the
  label is the pid of the process that ran it (``clean-<pid>``, ``second``: the drains).
- ``log-<role>-<pid>.txt``: the process's qo log (WARNING and up), one line per record
  with its time: ``unreadable object <key>: <reason>`` (logger ``qo.bad_objects``) says
  which poison the process met; ``lease lost`` which results were refused.
- ``faults-<pid>.json``: the faults injected in that process; ``stats-<pid>.json``: its
  worker's or scheduler's counters.
- ``recovered-<label>.log``: per worker, each task it recovered from a worker presumed
  dead: ``'<task id> <time> <pid of that worker>'`` (:class:`RecoveryLog`).
- ``kills.jsonl`` (the driver): ``{"pid", "role", "t"}`` per SIGKILL, ``t`` just before it
  (only processes that are up, their first ``stats-<pid>.json`` written, are killed).
- ``poison.jsonl`` (the driver): ``{"key", "kind", "t", "must"}`` per planted object;
  ``must``: the run is bound to read it (a task with a ready marker, a worker record,
  a schedule, a limit definition), so it must report it as unreadable.
"""

from __future__ import annotations

import asyncio
import collections
import glob
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import threading
import time
from typing import Any, Callable

from qo.hookspecs import hookimpl
from qo.model import TERMINAL

QUEUE = "chaos"
#: the driver writes this file in the work directory when the producers should stop
STOP_FILE = "stop"
DEFAULT_FAULTS = dict(error_rate=0.05, landed_error_rate=0.02, lost_response_rate=0.02, latency=(0.0, 0.005))
TICK_CRON = "* * * * * */2"  # every 2 seconds (croniter: seconds last)
TICK_EVERY = 2.0
LIMITED_SCOPE = "task_type:limited"  # a real limit (never refusing) whose state object gets poisoned
LOG_FORMAT = "%(created).3f %(process)d %(name)s %(levelname)s %(message)s"
BAD_LINE = re.compile(r"unreadable object (\S+): ")
LEASE_LOST = re.compile(r"task ([0-9a-f]{24}) \S+(?: \(queue \S+\))?: lease lost")  # qo/worker_log.py


def worker_settings(**overrides):
    from qo.worker import WorkerSettings

    base = dict(concurrency=4, poll_min=0.01, poll_max=0.2, lease_ttl=3.0, sweep_interval=0.3,
                buffer_max_age=0.5, dependency_sweep_interval=1.0, shutdown_timeout=1.0,
                orphan_grace=10.0, limits_refresh=2.0)
    base.update(overrides)
    return WorkerSettings(**base)


def _wrap(seed: int, faults: dict | None) -> Callable | None:
    if not faults:
        return None
    from qo.testing.faults import FaultyStorage

    return lambda s: FaultyStorage(s, seed=seed, **faults)


def _dump_json(work_dir: str, name: str, value: Any) -> None:
    path = os.path.join(work_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def _dump_faults(storage: Any, work_dir: str) -> None:
    injected = getattr(storage, "injected", None)
    if injected is not None:
        _dump_json(work_dir, f"faults-{os.getpid()}.json", injected())


def _log_to_file(work_dir: str, role: str, logger: str = "qo") -> logging.Handler:
    """The log of this process (WARNING and up) to ``log-<role>-<pid>.txt``; each record
    is flushed as it is written, so a SIGKILL loses none."""
    handler = logging.FileHandler(os.path.join(work_dir, f"log-{role}-{os.getpid()}.txt"))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.WARNING)
    logging.getLogger(logger).addHandler(handler)
    return handler


def _child(work_dir: str, role: str, main: Callable[[], Any]) -> None:
    """Run a child process's ``main``: its log to a file, and an exception that ends it
    logged there too (the driver sees the exit code and reports a process that died)."""
    _log_to_file(work_dir, role, logger="")  # the root logger: qo's and any library's
    try:
        asyncio.run(main())
    except BaseException:
        logging.getLogger("qo.chaos").exception("%s process %d died", role, os.getpid())
        raise


RECOVERED_BY = re.compile(r"worker \S+?-(\d+)-[0-9a-f]+ stopped renewing")


class RecoveryLog:
    """A plugin noting each task recovered from a worker presumed dead (its heartbeat
    older than its lease): ``'<task id> <time> <pid of that worker>'`` per line."""

    def __init__(self, path: str):
        self.path = path

    @hookimpl
    def qo_task_event(self, event: str, task: Any) -> None:
        error = task.last_error if isinstance(task.last_error, dict) else {}
        if error.get("type") != "LeaseExpired" or event not in ("recovered", "failed"):
            return
        m = RECOVERED_BY.search(str(error.get("message", "")))
        with open(self.path, "a") as f:
            f.write(f"{task.id} {time.time():.3f} {m.group(1) if m else '?'}\n")


def note_recoveries(queue: Any, work_dir: str, label: str) -> str:
    """Register a :class:`RecoveryLog`; returns its plugin name (the plugin manager may be
    the process's: unregister it when done)."""
    name = f"chaos-recovery-log-{label}-{os.urandom(4).hex()}"
    queue.plugins.register(RecoveryLog(os.path.join(work_dir, f"recovered-{label}.log")), name)
    return name


def register_handlers(worker: Any, log_path: str) -> None:
    import qo

    def note(line: str) -> None:
        with open(log_path, "a") as f:
            f.write(line + "\n")

    def ran(ctx: Any) -> None:
        note(f"{ctx.task.id} {ctx.attempt} {time.time():.3f}")

    async def plain(input, ctx):
        ran(ctx)
        await asyncio.sleep(random.uniform(0, 0.05))
        return input

    async def flaky(input, ctx):
        ran(ctx)
        if ctx.attempt == 1:
            raise qo.Retry(0.2, "first attempts fail")
        return input

    async def chain(input, ctx):
        ran(ctx)
        for dep, info in ctx.dependencies.items():
            if info.get("status") != "completed":
                note(f"DEP {ctx.task.id} {dep} {info.get('status')}")
        await asyncio.sleep(random.uniform(0, 0.05))
        return input

    for t in ("plain", "idem", "tick", "limited"):
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
        note_recoveries(q, work_dir, str(os.getpid()))
        worker = Worker(q, settings=worker_settings())
        register_handlers(worker, os.path.join(work_dir, f"ran-{os.getpid()}.log"))

        async def dump() -> None:
            while True:
                await asyncio.sleep(0.3)
                _dump_faults(q.storage, work_dir)
                _dump_json(work_dir, f"stats-{os.getpid()}.json", dict(worker.stats, role="worker"))

        dumper = asyncio.create_task(dump())
        try:
            await worker.run()
        finally:
            dumper.cancel()
            _dump_faults(q.storage, work_dir)

    _child(work_dir, "worker", main)


def run_scheduler(url: str, work_dir: str, seed: int, faults: dict | None) -> None:
    """A scheduler daemon that runs until killed, under faults."""
    import qo
    from qo.scheduler import Scheduler

    async def main() -> None:
        q = await qo.connect(url, queue=QUEUE, wrap_storage=_wrap(seed, faults))
        scheduler = Scheduler(q, poll_max=0.5)

        async def dump() -> None:
            while True:
                await asyncio.sleep(0.3)
                _dump_faults(q.storage, work_dir)
                _dump_json(work_dir, f"stats-{os.getpid()}.json", dict(scheduler.stats, role="scheduler"))

        dumper = asyncio.create_task(dump())
        try:
            await scheduler.run()
        finally:
            dumper.cancel()

    _child(work_dir, "scheduler", main)


def run_producer(url: str, work_dir: str, seed: int, faults: dict | None, seconds: float,
                 key_pool: int, limited: bool, pause: float = 0.03) -> None:
    """Submit a mix of work until the driver writes ``STOP_FILE`` (at most ``seconds``);
    record every call."""
    import qo

    rng = random.Random(seed)
    out_path = os.path.join(work_dir, f"submits-{os.getpid()}.jsonl")
    kinds = ["plain", "idem", "graph", "flaky", "bulk"] + (["limited"] if limited else [])
    weights = [4, 3, 1, 1, 1] + ([1] if limited else [])

    async def main() -> None:
        q = await qo.connect(url, queue=QUEUE, wrap_storage=_wrap(seed, faults))
        end = time.monotonic() + seconds
        stop = os.path.join(work_dir, STOP_FILE)
        dumped = time.monotonic()
        i = 0
        with open(out_path, "a") as out:
            def record(**rec: Any) -> None:
                out.write(json.dumps(rec) + "\n")
                out.flush()

            while time.monotonic() < end and not os.path.exists(stop):
                if time.monotonic() - dumped >= 0.3:  # the driver watches the faults injected so far
                    _dump_faults(q.storage, work_dir)
                    dumped = time.monotonic()
                i += 1
                tag = f"{seed}-{i}"
                kind = rng.choices(kinds, weights=weights)[0]
                try:
                    if kind in ("plain", "flaky", "limited"):
                        t = await q.submit(kind, {"tag": tag}, max_retries=20)
                        record(kind=kind, tag=tag, ids=[t.id])
                    elif kind == "bulk":  # a pack (submit_many's bulk path), some of it flaky
                        tags = [f"{tag}-{j}" for j in range(rng.randint(2, 12))]
                        items = [("flaky" if rng.random() < 0.2 else "plain", {"tag": t}, {"max_retries": 20})
                                 for t in tags]
                        try:
                            got = await q.submit_many(items)
                        except qo.BulkSubmitError as exc:
                            done = [(t, x.id) for t, x in zip(tags, exc.tasks) if x is not None]
                            if done:
                                record(kind=kind, tag=tag, tags=[t for t, _ in done], ids=[i for _, i in done])
                            record(kind=kind, tag=tag, tags=[t for t, x in zip(tags, exc.tasks) if x is None],
                                   raised=f"BulkSubmitError: {exc}")
                        else:
                            record(kind=kind, tag=tag, tags=tags, ids=[t.id for t in got])
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
                    if kind == "bulk":
                        record(kind=kind, tag=tag, tags=tags, raised=f"{type(exc).__name__}: {exc}")
                    else:
                        record(kind=kind, tag=tag, raised=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(rng.uniform(0, pause))
        _dump_faults(q.storage, work_dir)
        await q.close()

    _child(work_dir, "producer", main)


def progress(work_dir: str) -> collections.Counter:
    """What the run did so far: ``submitted`` (task ids the producers got back) and the
    faults injected by kind (as last dumped by each process). (The driver adds its kills:
    ``kills_worker``, ``kills_scheduler``.)"""
    out: collections.Counter = collections.Counter()
    for path in glob.glob(os.path.join(work_dir, "faults-*.json")):
        try:
            with open(path) as f:
                out.update({k: v for k, v in json.load(f).items() if ":" not in k})
        except (OSError, ValueError):  # being replaced: read next time
            continue
    for _, line in _read_lines(os.path.join(work_dir, "submits-*.jsonl")):
        try:
            out["submitted"] += len(json.loads(line).get("ids", []))
        except ValueError:  # a line not yet whole
            continue
    return out


def enough(done: collections.Counter, at_least: dict[str, int]) -> bool:
    """Every count of ``at_least`` reached in ``done``."""
    return all(done[k] >= n for k, n in at_least.items())


# -- poison -------------------------------------------------------------------------------


def _task_dict(task_id: str, now: float) -> dict[str, Any]:
    return {"id": task_id, "task_type": "plain", "input": {"tag": "poison"}, "status": "pending",
            "priority": 128, "attempt": 0, "max_retries": 3, "timeout_seconds": 30.0,
            "available_at": now, "created_at": now, "updated_at": now, "rev": "r", "schema": 1}


def _poison_task(kind: str, task_id: str, now: float) -> bytes:
    whole = json.dumps(_task_dict(task_id, now)).encode()
    if kind == "task-truncated":
        return whole[: len(whole) // 2]
    if kind == "task-array":
        return b"[]"
    if kind == "task-brace":
        return b"{"
    if kind == "task-not-utf8":
        return b'{"id": "\xff\xfe"}'
    if kind == "task-bad-field":
        return json.dumps({"id": task_id, "task_type": "plain", "status": "pending",
                           "timeout_seconds": "abc"}).encode()
    if kind == "task-other-id":  # a whole, valid task stored under another task's key
        from qo import keys

        return json.dumps(_task_dict(keys.new_task_id(), now)).encode()
    raise ValueError(kind)


TASK_POISON = ("task-truncated", "task-array", "task-brace", "task-not-utf8", "task-bad-field", "task-other-id")
WORKER_POISON = {
    "worker-bad-ttl": b'{"worker_id":"evil","heartbeat_at":0,"lease_ttl":"x","leases":{}}',
    "worker-array": b"[]",
    "worker-brace": b"{",
    "worker-leases-list": b'{"leases":[1]}',
    "worker-lease-not-dict": b'{"worker_id":"evil","heartbeat_at":0,"lease_ttl":3,"leases":{"0123456789abcdef01234567":"x"}}',
}
SCHEDULE_POISON = ("schedule-brace", "schedule-bad-time", "schedule-array")
LIMIT_POISON = ("limit-def-global", "limit-def-type", "limit-def-brace", "limit-state-used", "limit-state-unused")
POISON_KINDS = TASK_POISON + tuple(WORKER_POISON) + SCHEDULE_POISON + LIMIT_POISON


def plant(kind: str, n: int, rng: random.Random, limited: bool) -> list[tuple[str, bytes, bool]]:
    """Objects to write for one poison of ``kind`` (the ``n``-th planted): [(key, data, must)]."""
    from qo import keys

    now = time.time()
    out: list[tuple[str, bytes, bool]] = []
    if kind in TASK_POISON:
        tid = keys.new_task_id()
        marked = rng.random() < 0.75
        out.append((keys.task(QUEUE, tid), _poison_task(kind, tid, now), marked))
        if marked:  # so workers meet it: a ready marker like submit's
            out.append((keys.ready(QUEUE, 128, now, tid, "plain"), b"", False))
    elif kind in WORKER_POISON:
        out.append((keys.worker(QUEUE, f"evil{n}"), WORKER_POISON[kind], True))
    elif kind == "schedule-brace":
        out.append((f"{QUEUE}/schedules/zbad{n}.json", b"{", True))
    elif kind == "schedule-array":
        out.append((f"{QUEUE}/schedules/zbad{n}.json", b"[]", True))
    elif kind == "schedule-bad-time":
        out.append((f"{QUEUE}/schedules/zbad{n}.json", json.dumps(
            {"name": f"zbad{n}", "cron": "* * * * *", "task_type": "tick", "next_fire_at": "soon"}).encode(), True))
    elif kind == "limit-def-global":
        out.append((f"{QUEUE}/limits/defs/global.json", b'{"scope":"global","rate":"fast"}', True))
    elif kind == "limit-def-type":
        out.append((f"{QUEUE}/limits/defs/type.plain.json", b'{"scope":"task_type:plain","rate":"fast"}', True))
    elif kind == "limit-def-brace":
        out.append((f"{QUEUE}/limits/defs/zbad{n}.json", b"{", True))
    elif kind == "limit-state-used":  # the state of the limit the 'limited' tasks pass (the
        # poisoner submits one right after, so that a worker reads it)
        out.append((f"{QUEUE}/limits/state/type.limited.json",
                    rng.choice([b"{", b"[]", b'{"tokens":"x","at":0}', b'{"tokens":1}']), limited))
    elif kind == "limit-state-unused":
        out.append((f"{QUEUE}/limits/state/zbad{n}.json", b'{"tokens":"lots"}', False))
    else:
        raise ValueError(kind)
    return out


def poison_kinds(spec: str | None) -> tuple[str, ...]:
    """The kinds named by ``spec``: comma-separated kinds or prefixes (``task``,
    ``worker-array``, ``limit-def``); all of them for None or ``all``."""
    if spec is None or spec == "all":
        return POISON_KINDS
    out = []
    for part in spec.split(","):
        got = [k for k in POISON_KINDS if k == part or k.startswith(part.rstrip("-") + "-")]
        if not got:
            raise ValueError(f"no poison kind {part!r} (kinds: {', '.join(POISON_KINDS)})")
        out += [k for k in got if k not in out]
    return tuple(out)


async def _poisoner(url: str, work_dir: str, seed: int, every: tuple[float, float], limited: bool,
                    stop: threading.Event, kinds_planted: tuple[str, ...] = POISON_KINDS) -> None:
    """Plant a poison object every ``every`` seconds until ``stop``; kinds in a shuffled
    round robin, so a short run sees every kind. Each planted key goes to poison.jsonl
    before it is written (a key is poison from the moment it may exist)."""
    import qo

    rng = random.Random(seed + 77)
    q = await qo.connect(url, queue=QUEUE)
    n = 0
    kinds: list[str] = []
    try:
        with open(os.path.join(work_dir, "poison.jsonl"), "a") as out:
            while not stop.is_set():
                await asyncio.sleep(rng.uniform(*every))
                if stop.is_set():
                    break
                if not kinds:
                    kinds = list(kinds_planted)
                    rng.shuffle(kinds)
                kind = kinds.pop()
                n += 1
                objects = plant(kind, n, rng, limited)
                for key, _, must in objects:
                    if "/ready/" not in key:
                        out.write(json.dumps(dict(key=key, kind=kind, t=time.time(), must=must)) + "\n")
                out.flush()
                for key, data, _ in objects:  # the task before its marker
                    for _ in range(5):
                        try:
                            await q.storage.put(key, data)
                            break
                        except qo.QoError:
                            await asyncio.sleep(0.1)
                if kind == "limit-state-used" and limited:
                    # a task that passes this limit after the poison: some worker reads it
                    tag = f"poisoner-{n}"
                    try:
                        t = await q.submit("limited", {"tag": tag}, max_retries=20)
                        record = dict(kind="limited", tag=tag, ids=[t.id])
                    except qo.QoError as exc:
                        record = dict(kind="limited", tag=tag, raised=f"{type(exc).__name__}: {exc}")
                    with open(os.path.join(work_dir, f"submits-poisoner-{os.getpid()}.jsonl"), "a") as sub:
                        sub.write(json.dumps(record) + "\n")
    finally:
        await q.close()


# -- sampling: no task left running without a live lease ---------------------------------


async def without_live_lease(storage: Any, key: str, now: float, window: float,
                             stats: collections.Counter | None = None) -> str | None:
    """Why the task at ``key`` is left ``running`` without a live lease, or None: it is
    running past its lease deadline by more than ``window`` s, its worker's record does
    not name it under its lease with a heartbeat younger than ``window`` s, and it is
    still the same version after that record was read (not finished meanwhile)."""
    from qo.errors import CorruptObject, NotFound
    from qo.model import Task

    stats = collections.Counter() if stats is None else stats
    try:
        blob = await storage.get(key)
        task = Task.from_json(blob.data, key)
    except (NotFound, CorruptObject):
        return None
    stats["sampled"] += 1
    if task.status != "running":
        return None
    stats["running"] += 1
    if (task.lease_deadline or 0) > now - window:
        return None
    why = await _unheld(storage, task.worker_id, task.id, task.lease_id, now, window)
    if why is None or not await _unchanged(storage, key, blob.etag):
        return None
    return f"{why}; lease deadline {now - task.lease_deadline:.0f}s ago"


async def pack_without_live_lease(storage: Any, key: str, now: float, window: float,
                                  stats: collections.Counter | None = None) -> str | None:
    """Why the pack at ``key`` is left ``running`` without a live lease, or None: it was
    claimed more than ``window`` s ago, its holder's record does not name it under its
    lease with a heartbeat younger than ``window`` s, and it is still the same version."""
    from qo.errors import CorruptObject, NotFound
    from qo.packs import Pack

    stats = collections.Counter() if stats is None else stats
    try:
        blob = await storage.get(key)
        pack = Pack.from_json(blob.data, key)
    except (NotFound, CorruptObject):
        return None
    stats["sampled_packs"] += 1
    if pack.status != "running" or pack.lease is None:
        return None
    stats["running_packs"] += 1
    if float(pack.lease.get("claimed_at") or 0) > now - window:
        return None
    why = await _unheld(storage, pack.lease["worker_id"], pack.id, pack.lease["lease_id"], now, window)
    if why is None or not await _unchanged(storage, key, blob.etag):
        return None
    return f"pack {pack.id}: {why}"


async def _unheld(storage: Any, worker_id: Any, name: str, lease_id: Any, now: float, window: float) -> str | None:
    """Why worker ``worker_id``'s record does not hold ``name`` (a task or pack id) under
    ``lease_id`` with a heartbeat younger than ``window`` s; None if it does."""
    from qo import keys
    from qo.errors import NotFound

    try:
        rec = json.loads((await storage.get(keys.worker(QUEUE, worker_id or "none"))).data)
    except NotFound:
        return f"worker {worker_id} has no record"
    lease = (rec.get("leases") or {}).get(name)
    if not isinstance(lease, dict) or lease.get("lease") != lease_id:
        return f"worker {worker_id}'s record does not name it under its lease"
    if float(rec.get("heartbeat_at", 0)) < now - window:
        return f"worker {worker_id}'s heartbeat is {now - rec['heartbeat_at']:.0f}s old"
    return None


async def _unchanged(storage: Any, key: str, etag: str) -> bool:
    """``key`` still holds version ``etag`` (not finished or changed since it was judged)."""
    from qo.errors import NotFound

    try:
        return (await storage.get(key)).etag == etag
    except NotFound:
        return False


async def _sampler(url: str, t_start: float, window: float, every: float, size: int,
                   poison: Callable[[], set[str]], found: dict[str, str], stats: collections.Counter,
                   stop: threading.Event) -> None:
    """Every ``every`` s: read ``size`` tasks submitted at a random time at least
    ``window`` s ago; those left running without a live lease go to ``found`` (task id
    -> why; see :func:`without_live_lease`)."""
    import qo
    from qo import keys

    rng = random.Random(5)
    q = await qo.connect(url, queue=QUEUE)
    prefix = keys.tasks_prefix(QUEUE)
    try:
        while not stop.is_set():
            await asyncio.sleep(every)
            now = time.time()
            if now - window <= t_start:
                continue
            at = rng.uniform(t_start, now - window)
            try:
                entries = await q.storage.list(prefix, start_after=f"{prefix}{int(at * 1000):012x}", limit=size)
                bad = poison()
                for e in entries:
                    if e.key not in bad:
                        why = await without_live_lease(q.storage, e.key, now, window, stats)
                        if why is not None:
                            found.setdefault(e.key[len(prefix):-len(".json")], why)
                packs = keys.packs_prefix(QUEUE)
                for e in await q.storage.list(packs, start_after=f"{packs}{int(at * 1000):012x}", limit=4):
                    why = await pack_without_live_lease(q.storage, e.key, now, window, stats)
                    if why is not None:
                        found.setdefault(e.key[len(packs):-len(".json")], why)
            except qo.QoError:
                stats["sample_errors"] += 1
    finally:
        await q.close()


class _Background:
    """The poisoner and the sampler, in a thread of the driver with its own event loop."""

    def __init__(self, coros: list[Callable[[], Any]]):
        self.stop = threading.Event()
        self.errors: list[str] = []
        self._coros = coros
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-background")

    def _run(self) -> None:
        async def main() -> None:
            results = await asyncio.gather(*(c() for c in self._coros), return_exceptions=True)
            self.errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]

        asyncio.run(main())

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(30)


# -- the driver ---------------------------------------------------------------------------


def run_chaos(url: str, work_dir: str, *, seconds: float = 40.0, producers: int = 2, workers: int = 4,
              schedulers: int = 2, kill_every: tuple[float, float] = (0.5, 2.0), faults: dict | None = None,
              seed: int = 1, key_pool: int = 40, poison: bool | str = True,
              poison_every: tuple[float, float] = (0.3, 1.5),
              limited: bool = True, sample_every: float = 2.0, sample_size: int = 50, pause: float = 0.03,
              drain_timeout: float = 120.0, shards: int = 1, at_least: dict[str, int] | None = None,
              max_seconds: float | None = None, say: Callable[[str], None] = lambda s: None) -> dict:
    """Run the chaos, then drain cleanly and check; returns a report with ``problems``.
    ``poison``: True (every kind), False, or the kinds to plant (see :func:`poison_kinds`).
    ``shards``: the queue's key layout (docs/architecture.md §5l), set before it all starts.
    ``at_least``: the chaos goes on past ``seconds`` (up to ``max_seconds``, default 3x)
    until this much happened (:func:`progress`): a loaded machine does less per second, and
    a run that injected no fault of a kind proves nothing about it."""
    kinds = poison_kinds(poison if isinstance(poison, str) else None)
    faults = DEFAULT_FAULTS if faults is None else faults
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random(seed)
    os.makedirs(work_dir, exist_ok=True)
    handler = _log_to_file(work_dir, "driver")
    try:
        asyncio.run(_setup(url, schedulers > 0, limited, shards))
        t0 = time.monotonic()
        wall0 = time.time()
        started = collections.Counter()
        problems: list[str] = []

        def start(role: str) -> multiprocessing.Process:
            started[role] += 1
            target = run_worker if role == "worker" else run_scheduler
            s = seed * 1000 + (0 if role == "worker" else 600) + started[role]
            p = ctx.Process(target=target, args=(url, work_dir, s, faults), daemon=True)
            p.start()
            return p

        pool = [("worker", start("worker")) for _ in range(workers)]
        pool += [("scheduler", start("scheduler")) for _ in range(schedulers)]
        cap = max(seconds, max_seconds if max_seconds is not None else 3 * seconds) if at_least else seconds
        prods = [ctx.Process(target=run_producer, daemon=True,
                             args=(url, work_dir, seed * 1000 + 500 + i, faults, cap, key_pool, limited, pause))
                 for i in range(producers)]
        for p in prods:
            p.start()
        ws = worker_settings()
        window = ws.lease_ttl + 1.5 * ws.sweep_interval + 15.0
        sampled: dict[str, str] = {}
        sample_stats: collections.Counter = collections.Counter()
        poison_keys: set[str] = set()
        poison_path = os.path.join(work_dir, "poison.jsonl")

        def known_poison() -> set[str]:
            if os.path.exists(poison_path):
                with open(poison_path) as f:  # a line not yet whole is read next time
                    poison_keys.update(json.loads(line)["key"] for line in f if line.endswith("\n"))
            return poison_keys

        bg: list[Callable[[], Any]] = []
        back = _Background(bg)
        bg.append(lambda: _sampler(url, wall0, window, sample_every, sample_size, known_poison, sampled,
                                   sample_stats, back.stop))
        if poison:
            bg.append(lambda: _poisoner(url, work_dir, seed, poison_every, limited, back.stop, kinds))
        back.start()
        kills: collections.Counter[str] = collections.Counter()
        died: list[str] = []
        kill_log = open(os.path.join(work_dir, "kills.jsonl"), "a")
        stop_path = os.path.join(work_dir, STOP_FILE)
        try:
            while any(p.is_alive() for p in prods):
                time.sleep(rng.uniform(*kill_every))
                ran_for = time.monotonic() - t0
                done = progress(work_dir) + collections.Counter({f"kills_{r}": n for r, n in kills.items()})
                if not os.path.exists(stop_path) and ran_for >= seconds and (
                        ran_for >= cap or enough(done, at_least or {})):
                    open(stop_path, "w").close()
                for i, (role, p) in enumerate(pool):  # a process that ended by itself: a problem
                    if not p.is_alive():
                        died.append(f"{role} process {p.pid} exited by itself with {p.exitcode}")
                        pool[i] = (role, start(role))
                if not any(p.is_alive() for p in prods):
                    break
                # only a process that is up (its first stats written): on a loaded machine a
                # new one can take longer to start than the pause between kills, and killing
                # processes that never ran leaves the run with no faults and no work under chaos
                up = [i for i, (_, p) in enumerate(pool) if os.path.exists(os.path.join(work_dir, f"stats-{p.pid}.json"))]
                if not up:
                    continue
                i = rng.choice(up)
                role, p = pool[i]
                kill_log.write(json.dumps(dict(pid=p.pid, role=role, t=time.time())) + "\n")
                kill_log.flush()
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
                kills[role] += 1
                pool[i] = (role, start(role))
            for p in prods:
                p.join(drain_timeout)
            for role, p in pool:
                if not p.is_alive():
                    died.append(f"{role} process {p.pid} exited by itself with {p.exitcode}")
        finally:
            kill_log.close()
            back.finish()
            for _, p in pool + [("producer", p) for p in prods]:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                    p.join(10)
        chaos_s = time.monotonic() - t0
        say(f"chaos over after {chaos_s:.1f}s: {dict(kills)} kills, {dict(started)} processes; draining")
        producer_codes = [p.exitcode for p in prods]
        t1 = time.monotonic()
        report = asyncio.run(_drain_and_check(url, work_dir, drain_timeout, chaos_s))
        report["problems"][:0] = died + back.errors
        report.update(chaos_seconds=round(chaos_s, 1), drain_seconds=round(time.monotonic() - t1, 1),
                      kills=sum(kills.values()), kills_by_role=dict(kills), processes_started=dict(started),
                      producer_exit_codes=producer_codes, sampled=dict(sample_stats),
                      running_without_live_lease_during_run=sampled)
        for tid, why in sorted(sampled.items()):
            report["problems"].append(f"task {tid} was left running without a live lease during the run: {why}")
        if any(c != 0 for c in producer_codes):
            report["problems"].append(f"a producer exited with {producer_codes}")
        s = report["summary"]
        s["left_running_without_live_lease"] += len(sampled)
        s["kills_workers"], s["kills_schedulers"] = kills["worker"], kills["scheduler"]
        return report
    finally:
        logging.getLogger("qo").removeHandler(handler)
        handler.close()


async def _setup(url: str, schedule: bool, limited: bool, shards: int = 1) -> None:
    import qo

    q = await qo.connect(url, queue=QUEUE)
    if shards > 1:
        await q.set_layout(shards)
    if schedule:
        await q.schedules.add("tick", cron=TICK_CRON, task_type="tick", input={"tag": "tick"}, max_retries=20,
                              catch_up="all")
    if limited:  # never refuses: only here so that workers read and write its state object
        await q.limits.set(LIMITED_SCOPE, rate=100000)
    await q.close()


async def _bounded(worker: Any, timeout: float, problems: list[str], what: str) -> dict:
    """Run ``worker`` until idle; one that is not idle after ``timeout`` is a problem."""
    run = asyncio.create_task(worker.run(until_idle=True))
    done, _ = await asyncio.wait([run], timeout=timeout)
    if not done:
        problems.append(f"{what} was not idle after {timeout}s")
        worker.stop()
    try:
        return dict(await run)
    except Exception as exc:  # noqa: BLE001 - the check reports it
        problems.append(f"{what} raised {type(exc).__name__}: {exc}")
        return {}


def _read_lines(pattern: str) -> list[tuple[str, str]]:
    """(file name, line) of every line of the files matching ``pattern``."""
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path, errors="replace") as f:
            out += [(os.path.basename(path), line.rstrip("\n")) for line in f]
    return out


async def _read_tasks(storage: Any, poison: set[str], problems: list[str]) -> tuple[dict, set[str]]:
    """Every task that is not poison, read here (not through the engine): the checker
    must not depend on what it checks. An unreadable object that is not poison is a
    problem. Returns (id -> Task, keys of poison tasks still there)."""
    from qo import keys
    from qo.errors import CorruptObject, NotFound
    from qo.model import Task

    entries, cursor = [], None
    while True:
        page = await storage.list(keys.tasks_prefix(QUEUE), start_after=cursor, limit=1000)
        entries += page
        if len(page) < 1000:
            break
        cursor = page[-1].key
    tasks, left = {}, set()
    sem = asyncio.Semaphore(16)

    async def one(key: str) -> None:
        if key in poison:
            left.add(key)
            return
        async with sem:
            try:
                blob = await storage.get(key)
            except NotFound:
                return
        try:
            t = Task.from_json(blob.data, key)
        except CorruptObject as exc:
            problems.append(f"{key} is not poison, yet unreadable: {exc.reason}")
            return
        tasks[t.id] = t

    await asyncio.gather(*(one(e.key) for e in entries))
    await _read_packs(storage, tasks, problems)
    return tasks, left


async def _read_packs(storage: Any, tasks: dict, problems: list[str]) -> None:
    """The tasks inside packs (submit_many's bulk path); a task that moved out of its
    pack was read from its own object already."""
    from qo import keys
    from qo.errors import CorruptObject
    from qo.packs import MOVED, Pack

    for entry in await _every_key(storage, keys.packs_prefix(QUEUE)):
        try:
            pack = Pack.from_json((await storage.get(entry.key)).data, entry.key)
        except CorruptObject as exc:
            problems.append(f"{entry.key} is unreadable: {exc.reason}")
            continue
        for i in range(len(pack.entries)):
            if pack.status_of(i) == MOVED:
                if pack.task_id(i) not in tasks:
                    problems.append(f"task {pack.task_id(i)} moved out of its pack, and its object is missing")
                continue
            tasks[pack.task_id(i)] = pack.task(i)


def explain_reruns(runs: dict[str, list[tuple[float, int, str]]], types: dict[str, str], kills: dict[str, float],
                   lease_lost: set[tuple[str, str]],
                   recoveries: dict[str, list[tuple[float, str]]] | None = None) -> tuple[collections.Counter, dict[str, str]]:
    """Each run of a task but its last must be explained:

    - ``after_kill``: its process was SIGKILLed between its start and the next run's
      start (``kills``: process label -> time);
    - ``flaky_first_attempt``: a flaky task's first attempt (it retries on purpose);
    - ``after_lease_lost``: its process said it lost that task's lease (``lease_lost``:
      (pid, task id));
    - ``lease_expired``: between the two runs another worker recovered the task from
      this run's process, whose heartbeat was older than its lease (``recoveries``: task
      id -> [(time, pid of the worker recovered from)]): the process stalled (storage
      faults, backoff, an overloaded machine) and was either killed before it could
      notice (``lease_expired_then_killed``) or not (``lease_expired``).

    ``runs``: task id -> [(start time, attempt, process label)]; the drains' label is
    ``clean-<pid>``. Returns counts by explanation and, per task with an unexplained
    run, why it is one."""
    reruns: collections.Counter[str] = collections.Counter()
    unexplained: dict[str, str] = {}
    recoveries = recoveries or {}
    for tid, rs in runs.items():
        rs = sorted(rs)
        bad_here = []
        for (t, attempt, label), (t_next, _, _) in zip(rs, rs[1:]):
            pid = label[len("clean-"):] if label.startswith("clean-") else label
            if types.get(tid) == "flaky" and attempt == 1:
                reruns["flaky_first_attempt"] += 1
            elif label in kills and t <= kills[label] <= t_next + 0.5:
                reruns["after_kill"] += 1
            elif (pid, tid) in lease_lost:
                reruns["after_lease_lost"] += 1
            elif any(t <= at <= t_next + 0.5 and by == pid for at, by in recoveries.get(tid, ())):
                reruns["lease_expired_then_killed" if label in kills and kills[label] > t else "lease_expired"] += 1
            else:
                reruns["unexplained"] += 1
                bad_here.append(f"attempt {attempt} in process {label} at {t:.3f}, run again at {t_next:.3f}")
        if bad_here:
            unexplained[tid] = "; ".join(bad_here)
    return reruns, unexplained


async def _drain_and_check(url: str, work_dir: str, drain_timeout: float, chaos_s: float) -> dict:
    import qo
    from qo import keys
    from qo.scheduler import Scheduler
    from qo.worker import Worker

    problems: list[str] = []
    poison: dict[str, dict] = {}
    for _, line in _read_lines(os.path.join(work_dir, "poison.jsonl")):
        rec = json.loads(line)
        poison.setdefault(rec["key"], rec)
        poison[rec["key"]]["must"] = poison[rec["key"]]["must"] or rec["must"]
    q = await qo.connect(url, queue=QUEUE)
    if await q.storage.list(f"{QUEUE}/schedules/"):
        # one clean pass (it reads every schedule, poison too), then stop the ticks
        try:
            await Scheduler(q).run_once()
        except Exception as exc:  # noqa: BLE001 - the check reports it
            problems.append(f"a clean scheduler pass raised {type(exc).__name__}: {exc}")
        try:
            await q.schedules.remove("tick")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"removing the tick schedule raised {type(exc).__name__}: {exc}")
    plugin = note_recoveries(q, work_dir, f"clean-{os.getpid()}")
    try:
        clean = Worker(q, settings=worker_settings())
        register_handlers(clean, os.path.join(work_dir, f"ran-clean-{os.getpid()}.log"))
        drain = await _bounded(clean, drain_timeout, problems, "the clean drain")
        second = Worker(q, settings=worker_settings())
        second_log = os.path.join(work_dir, "ran-second.log")
        register_handlers(second, second_log)
        again = await _bounded(second, 30.0, problems, "the second clean drain")
    finally:
        q.plugins.unregister(plugin)

    tasks, poison_left = await _read_tasks(q.storage, set(poison), problems)
    by_status = collections.Counter(t.status for t in tasks.values())
    # handler runs: task id -> [(time, attempt, process label)]
    runs: dict[str, list[tuple[float, int, str]]] = collections.defaultdict(list)
    for name, line in _read_lines(os.path.join(work_dir, "ran-*.log")):
        parts = line.split()
        label = name[len("ran-"):-len(".log")]
        if not parts:
            continue
        if parts[0] == "DEP":
            problems.append(f"chain task {parts[1]} ran while its dependency {parts[2]} was {parts[3]}")
        elif len(parts) == 3 and keys.TASK_ID.match(parts[0]):
            runs[parts[0]].append((float(parts[2]), int(parts[1]), label))
    # what producers asked for
    submits, raised = collections.Counter(), collections.Counter()
    ok_tags: dict[str, set[str]] = collections.defaultdict(set)  # tag -> ids returned
    raised_tags: set[str] = set()
    for _, line in _read_lines(os.path.join(work_dir, "submits-*.jsonl")):
        rec = json.loads(line)
        kind = rec["kind"]
        tags = rec["tags"] if "tags" in rec else [rec["tag"] + n for n in "abc"] if kind == "graph" else [rec["tag"]]
        if "raised" in rec:
            raised[kind] += 1
            raised_tags.update(tags)
        else:
            submits[kind] += 1
            for tag, tid in zip(tags, rec["ids"]):
                ok_tags[tag].add(tid)
    submitted_ids = set().union(*ok_tags.values()) if ok_tags else set()
    by_tag: dict[str, list[str]] = collections.defaultdict(list)
    for t in tasks.values():
        tag = t.input.get("tag") if isinstance(t.input, dict) else None
        by_tag[tag].append(t.id)
    lost = set()  # returned to a producer, and not there
    for tag, ids in ok_tags.items():
        if len(ids) > 1:
            problems.append(f"{tag}: submits returned different tasks {sorted(ids)}")
        for tid in ids:
            if tid not in tasks:
                lost.add(tid)
                problems.append(f"{tag}: submit returned {tid}, which does not exist")
    for tag, ids in by_tag.items():
        if tag == "tick":
            continue
        if len(ids) > 1:
            problems.append(f"{tag}: {len(ids)} tasks {sorted(ids)} (a duplicate)")
        if tag not in ok_tags and tag not in raised_tags:
            problems.append(f"tasks {ids} with tag {tag!r} that nobody submitted")
    left_running = 0
    for t in tasks.values():
        if t.status not in TERMINAL:
            extra = ""
            left_running += t.status == "running"
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
            problems.append(f"a handler ran task {tid}, which does not exist (or is poison)")

    # a task run more than once: each earlier run must be explained by a kill of its process
    # between its start and the next run's start, by a flaky task's first attempt (it
    # retries on purpose), or by its worker saying it lost that task's lease
    kills: dict[str, float] = {}
    for _, line in _read_lines(os.path.join(work_dir, "kills.jsonl")):
        rec = json.loads(line)
        kills[str(rec["pid"])] = rec["t"]
    logs = _read_lines(os.path.join(work_dir, "log-*.txt"))
    lease_lost: set[tuple[str, str]] = set()  # (process label, task id)
    for name, line in logs:
        m = LEASE_LOST.search(line)
        if m:
            lease_lost.add((name.rsplit("-", 1)[1][:-len(".txt")], m.group(1)))
    recoveries: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for _, line in _read_lines(os.path.join(work_dir, "recovered-*.log")):
        parts = line.split()
        if len(parts) == 3:
            recoveries[parts[0]].append((float(parts[1]), parts[2]))
    reruns, unexplained = explain_reruns(runs, {tid: t.task_type for tid, t in tasks.items()}, kills, lease_lost,
                                         recoveries)
    for tid, why in unexplained.items():
        problems.append(f"task {tid} ({tasks[tid].task_type if tid in tasks else '?'}) ran again though no kill "
                        f"interrupted it: {why}")

    # scheduled ticks: one task per fire time, each named by its idempotency record
    ticks = set(by_tag.get("tick", []))
    recorded = set()
    for e in await _every_key(q.storage, f"{QUEUE}/idem/custom.schedule/"):  # past 1000 too
        recorded.add(json.loads((await q.storage.get(e.key)).data)["task_id"])
    double_fires = ticks - recorded
    if double_fires:
        problems.append(f"tick tasks no fire record names (double fires): {sorted(double_fires)}")
    expected_ticks = int(chaos_s / TICK_EVERY)
    if recorded and len(ticks) < 0.8 * expected_ticks:
        problems.append(f"only {len(ticks)} ticks fired in {chaos_s:.0f}s, every {TICK_EVERY}s expected ~{expected_ticks}")
    # the second clean worker must have found nothing to do
    if again.get("claimed") or (os.path.exists(second_log) and os.path.getsize(second_log)):
        problems.append(f"the second clean drain still found work: {dict(again)}")
    leftover = collections.Counter()
    for prefix in (keys.ready_prefix(QUEUE), keys.delayed_prefix(QUEUE)):
        for e in await _every_key(q.storage, prefix):
            m = keys.parse_marker(e.key)
            tid = m.task_id if m is not None else None
            leftover[tasks[tid].status if tid in tasks else "no task (poison or gone)"] += 1

    # poison: what the run's processes reported as unreadable (qo.bad_objects), per key
    reported: dict[str, str] = {}
    errors = collections.Counter()
    for name, line in logs:
        m = BAD_LINE.search(line)
        if m:
            reported.setdefault(m.group(1), name.split("-")[1])
        elif " ERROR " in line or " CRITICAL " in line:
            errors[re.sub(r"[0-9a-f]{24}|\d+", "N", line.split(" ", 4)[-1])[:160]] += 1
        elif line.startswith("Traceback") or line.startswith(("TypeError", "ValueError", "KeyError",
                                                                "AttributeError", "JSONDecodeError")):
            errors[line[:160]] += 1
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
    missed_must = []
    for key, rec in poison.items():
        k = by_kind[rec["kind"]]
        k["planted"] += 1
        k["reported"] += key in reported
        if rec["must"]:
            k["must"] += 1
            if key not in reported:
                missed_must.append(key)
                k["must_missed"] += 1
    for key in missed_must:
        problems.append(f"poison {key} ({poison[key]['kind']}) was never reported as unreadable")
    not_poison = sorted(k for k in reported if k not in poison)
    for key in not_poison:
        problems.append(f"{key} was reported unreadable, yet it is not poison")
    faults = collections.Counter()
    for path in glob.glob(os.path.join(work_dir, "faults-*.json")):
        with open(path) as f:
            faults.update({k: v for k, v in json.load(f).items() if ":" not in k})
    stats = collections.Counter()
    for path in glob.glob(os.path.join(work_dir, "stats-*.json")):
        with open(path) as f:
            d = json.load(f)
        role = d.pop("role")
        stats.update({f"{role}.{k}": v for k, v in d.items()})
    await q.close()
    good = [t for t in tasks.values()]
    summary = dict(
        tasks_submitted=len(submitted_ids), ticks_fired=len(ticks), tasks=len(tasks),
        completed=by_status.get("completed", 0), lost=len(lost),
        not_completed=sum(1 for t in tasks.values() if t.status != "completed"),
        left_running_without_live_lease=left_running,
        completed_twice_without_kill=len(unexplained), double_schedule_fires=len(double_fires),
        every_good_task_completed=bool(good) and all(t.status == "completed" for t in good) and not lost,
        poison_planted=len(poison), poison_reported_unreadable=sum(1 for k in poison if k in reported),
        poison_must_be_reported=sum(1 for r in poison.values() if r["must"]),
        poison_must_missed=len(missed_must))
    return dict(summary=summary, problems=problems, tasks=len(tasks), statuses=dict(by_status),
                submits=dict(submits), raised_submits=dict(raised), ticks=len(ticks), expected_ticks=expected_ticks,
                handler_runs=sum(len(r) for r in runs.values()),
                ran_more_than_once=sum(1 for r in runs.values() if len(r) > 1), reruns=dict(reruns),
                drain=dict(drain), second_drain=dict(again), leftover_markers=dict(leftover),
                injected=dict(faults), process_stats=dict(stats), poison_by_kind={k: dict(v) for k, v in sorted(by_kind.items())},
                poison_left_in_tasks=len(poison_left), logged_errors=dict(errors.most_common(15)))


async def _every_key(storage, prefix: str) -> list:
    """Every entry under ``prefix``: ``storage.list`` returns at most 1000 a call (a run
    with 1,063 schedule fires once saw only 1,000 of their records and called the rest
    double fires)."""
    out: list = []
    while True:
        page = await storage.list(prefix, start_after=out[-1].key if out else None, limit=1000)
        out += page
        if len(page) < 1000:
            return out

