"""qo's soak run: one worker and one scheduler (processes) for N minutes at a steady
trickle of submits and a per-second schedule; their memory, open files and requests per
minute must not grow.

    python benchmarks/soak.py [--minutes 30] [--backend local|s3] [--rate 5]
        [--interval 5] [--warmup 60] [--rss-tolerance-mb 20] [--rss-tolerance 0.2]
        [--fd-tolerance 8] [--requests-tolerance 0.5] [--nofile 1024] [--json FILE]

The driver submits ``--rate`` tasks per second (noop handler) and a cron schedule fires
every second; the worker and the scheduler count their requests with
``qo.counting.CountingStorage`` (each writes its counts to a file every 2 s). Every
``--interval`` minutes (and at the start and the end) it prints, per process: resident
memory (VmRSS), open file descriptors (``/proc/<pid>/fd``, printed as others + the
local backend's lock files, which it keeps open by design, one per lock stripe touched,
at most 1024) and requests per minute over the interval. The baseline is the first sample after ``--warmup`` seconds (imports,
pools and caches fill first). It stops by itself after ``--minutes``, stops the
processes (SIGTERM), checks every submitted task completed, and exits 1 if RSS grew by
more than max(``--rss-tolerance-mb``, ``--rss-tolerance`` x baseline), open files
(other than lock files) by more than ``--fd-tolerance``, lock files beyond 1024, or
requests per minute by more than ``--requests-tolerance`` x the baseline interval's
(plus 60), or more than 90% of ``--nofile`` (the processes' soft limit of open files,
1024 by default as on most Linux systems) were open, or a task was not completed; 2 if
a process died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

QUEUE = "soak"
CRON = "* * * * * *"  # every second (croniter: seconds last)


def _write_json(path: str, value: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def _limit_files(nofile: int) -> None:
    if nofile > 0:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard) if hard > 0 else nofile, hard))


def run_worker(url: str, work_dir: str, nofile: int = 0) -> None:
    _limit_files(nofile)
    import qo
    from qo.counting import CountingStorage
    from qo.worker import Worker

    async def main() -> None:
        q = await qo.connect(url, queue=QUEUE, wrap_storage=CountingStorage)
        worker = Worker(q)

        @worker.handler("noop")
        async def noop(input):
            return None

        worker.handler("tick")(noop)

        async def dump() -> None:
            while True:
                _write_json(os.path.join(work_dir, "counts-worker.json"),
                            dict(counts=q.storage.counts(), stats=dict(worker.stats), t=time.time()))
                await asyncio.sleep(2.0)

        dumper = asyncio.create_task(dump())
        try:
            await worker.run()  # until SIGTERM
        finally:
            dumper.cancel()
            _write_json(os.path.join(work_dir, "counts-worker.json"),
                        dict(counts=q.storage.counts(), stats=dict(worker.stats), t=time.time()))
            await q.close()

    asyncio.run(main())


def run_scheduler(url: str, work_dir: str, nofile: int = 0) -> None:
    _limit_files(nofile)
    import qo
    from qo.counting import CountingStorage
    from qo.scheduler import Scheduler

    async def main() -> None:
        q = await qo.connect(url, queue=QUEUE, wrap_storage=CountingStorage)
        scheduler = Scheduler(q)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

        async def dump() -> None:
            while True:
                _write_json(os.path.join(work_dir, "counts-scheduler.json"),
                            dict(counts=q.storage.counts(), stats=dict(scheduler.stats), t=time.time()))
                await asyncio.sleep(2.0)

        dumper = asyncio.create_task(dump())
        try:
            await scheduler.run(stop)
        finally:
            dumper.cancel()
            await q.close()

    asyncio.run(main())


LOCK_STRIPES = 1024  # qo_local's default
LOCK_DIR = "/.qo-locks/"  # the local backend keeps one lock file open per stripe touched


def proc_sample(pid: int) -> dict[str, float]:
    """Resident memory (MB) and open file descriptors of a live process: all of them
    (``fds``), and those that are the local backend's lock files (``lock_fds``: it keeps
    each lock stripe's file open, at most ``lock_stripes``, 1024 by default; they fill
    up over the first minutes of a run and are not a leak)."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    fds = os.listdir(f"/proc/{pid}/fd")
    locks = 0
    for fd in fds:
        try:
            locks += LOCK_DIR in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return dict(rss_mb=round(rss, 1), fds=len(fds), lock_fds=locks)


def total_requests(work_dir: str, role: str) -> int:
    try:
        with open(os.path.join(work_dir, f"counts-{role}.json")) as f:
            return sum(json.load(f)["counts"].values())
    except (OSError, ValueError):
        return 0


async def submitter(url: str, rate: float, stop_at: float, out: dict) -> None:
    """Submit ``rate`` noop tasks per second until ``stop_at`` (monotonic)."""
    import qo

    q = await qo.connect(url, queue=QUEUE)
    next_at = time.monotonic()
    try:
        while time.monotonic() < stop_at:
            try:
                await q.submit("noop", {"n": out["submitted"]})
                out["submitted"] += 1
            except qo.QoError as exc:
                out["errors"] += 1
                out["last_error"] = str(exc)
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        await q.close()


async def add_schedule(url: str) -> None:
    import qo

    q = await qo.connect(url, queue=QUEUE)
    await q.schedules.add("soak-tick", cron=CRON, task_type="tick")
    await q.close()


async def final_statuses(url: str) -> dict[str, dict[str, int]]:
    import qo

    q = await qo.connect(url, queue=QUEUE)
    out: dict[str, dict[str, int]] = {}
    async for t in q.list(limit=None):
        out.setdefault(t.task_type, {})
        out[t.task_type][t.status] = out[t.task_type].get(t.status, 0) + 1
    await q.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--backend", choices=["local", "s3"], default="local")
    p.add_argument("--rate", type=float, default=5.0, help="tasks submitted per second")
    p.add_argument("--interval", type=float, default=5.0, help="minutes between printed rows "
                   "(shortened to a quarter of the run for runs under two intervals)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline sample "
                   "(at most a quarter of the run)")
    p.add_argument("--rss-tolerance-mb", type=float, default=20.0)
    p.add_argument("--rss-tolerance", type=float, default=0.2, help="fraction of the baseline RSS")
    p.add_argument("--fd-tolerance", type=int, default=8)
    p.add_argument("--requests-tolerance", type=float, default=0.5,
                   help="fraction of the baseline interval's requests per minute")
    p.add_argument("--nofile", type=int, default=1024, help="the processes' soft limit of open files "
                   "(RLIMIT_NOFILE; 1024 is the usual default; 0: inherit)")
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args()

    total_s = args.minutes * 60
    interval_s = args.interval * 60
    if total_s < 2 * interval_s:
        interval_s = total_s / 4
    warmup_s = min(args.warmup, total_s / 4)
    work = tempfile.mkdtemp(prefix="qo-soak-", dir=args.tmpdir)
    server = None
    procs: dict[str, mp.Process] = {}
    try:
        if args.backend == "s3":
            from qo.testing.moto import MotoServer

            server = MotoServer()
            server.start()
            url = server.new_bucket(prefix="soak")
        else:
            url = os.path.join(work, "store")
        asyncio.run(add_schedule(url))
        ctx = mp.get_context("spawn")
        procs = {"worker": ctx.Process(target=run_worker, args=(url, work, args.nofile), daemon=True),
                 "scheduler": ctx.Process(target=run_scheduler, args=(url, work, args.nofile), daemon=True)}
        for proc in procs.values():
            proc.start()
        t0 = time.monotonic()
        sub = dict(submitted=0, errors=0)
        rows: list[dict[str, Any]] = []

        def sample(label: str) -> dict[str, Any]:
            row: dict[str, Any] = dict(label=label, minute=round((time.monotonic() - t0) / 60, 2),
                                       t=time.monotonic(), submitted=sub["submitted"])
            for role, proc in procs.items():
                row[role] = dict(proc_sample(proc.pid), requests=total_requests(work, role))
            if rows:
                prev = rows[-1]
                minutes = (row["t"] - prev["t"]) / 60
                for role in procs:
                    row[role]["requests_per_min"] = round((row[role]["requests"] - prev[role]["requests"]) / minutes, 1)
            rows.append(row)
            cells = "  ".join(
                f"{role}: {row[role]['rss_mb']:7.1f} MB {row[role]['fds'] - row[role]['lock_fds']:3d}"
                f"+{row[role]['lock_fds']} fds "
                f"{row[role].get('requests_per_min', '-'):>7} req/min" for role in procs)
            print(f"{label:>9} {row['minute']:6.2f} min  submitted {row['submitted']:6d}  {cells}", file=sys.stderr)
            return row

        async def drive() -> None:
            submit = asyncio.create_task(submitter(url, args.rate, t0 + total_s, sub))
            schedule = [("warmup", warmup_s)]
            at = warmup_s + interval_s
            while at < total_s - 1:
                schedule.append(("interval", at))
                at += interval_s
            schedule.append(("end", total_s))
            await asyncio.sleep(2.0)
            sample("start")
            for label, when in schedule:
                while time.monotonic() - t0 < when:
                    await asyncio.sleep(min(1.0, when - (time.monotonic() - t0)))
                    for role, proc in procs.items():
                        if not proc.is_alive():
                            raise SystemExit(f"the {role} process died with {proc.exitcode}")
                sample(label)
            await submit

        try:
            asyncio.run(drive())
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 2
        # let the backlog finish (at most 60 s), then stop the processes
        deadline = time.monotonic() + 60
        while True:
            statuses = asyncio.run(final_statuses(url))
            noop = statuses.get("noop", {})
            if noop.get("completed", 0) >= sub["submitted"] or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        for proc in procs.values():
            os.kill(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.join(30)
        base = next(r for r in rows if r["label"] == "warmup")
        first = rows[rows.index(base) + 1] if rows.index(base) + 1 < len(rows) else rows[-1]
        end = rows[-1]
        problems = []
        for role in procs:
            b, e = base[role], end[role]
            rss_allowed = max(args.rss_tolerance_mb, args.rss_tolerance * b["rss_mb"])
            if e["rss_mb"] - b["rss_mb"] > rss_allowed:
                problems.append(f"{role}: RSS grew {b['rss_mb']} -> {e['rss_mb']} MB (allowed +{rss_allowed:.1f})")
            other_b, other_e = b["fds"] - b["lock_fds"], e["fds"] - e["lock_fds"]
            if other_e - other_b > args.fd_tolerance:
                problems.append(f"{role}: open files (not lock files) grew {other_b} -> {other_e} "
                                f"(allowed +{args.fd_tolerance})")
            if args.nofile and max(r[role]["fds"] for r in rows) > 0.9 * args.nofile:
                problems.append(f"{role}: {max(r[role]['fds'] for r in rows)} files open, near the limit of "
                                f"{args.nofile} (--nofile)")
            if e["lock_fds"] > LOCK_STRIPES:
                problems.append(f"{role}: {e['lock_fds']} lock files open, more than the {LOCK_STRIPES} stripes")
            r0, r1 = first[role].get("requests_per_min", 0), e.get("requests_per_min", 0)
            if r1 > r0 * (1 + args.requests_tolerance) + 60:
                problems.append(f"{role}: requests per minute grew {r0} -> {r1}")
        if noop.get("completed", 0) != sub["submitted"]:
            problems.append(f"{sub['submitted']} tasks submitted, their statuses at the end: {noop}")
        report = dict(backend=args.backend, minutes=args.minutes, rate=args.rate, submitted=sub["submitted"],
                      submit_errors=sub["errors"], statuses=statuses, rows=rows, problems=problems,
                      exit_codes={role: proc.exitcode for role, proc in procs.items()},
                      load_average=os.getloadavg()[0])
        print(json.dumps(report, indent=1))
        if args.json:
            _write_json(args.json, report)
        for line in problems:
            print(f"PROBLEM: {line}", file=sys.stderr)
        print("soak: " + ("no growth beyond tolerance" if not problems else f"{len(problems)} problems"),
              file=sys.stderr)
        return 1 if problems else 0
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
