"""qo's chaos run at any size: producers, workers and schedulers (processes) on one
bucket, storage faults injected in every process, workers and schedulers SIGKILLed at
random and restarted, poison objects planted while it runs; then a clean drain and the
invariants. The driver is tests/chaos_procs.py (the CI test runs it small).

    python benchmarks/chaos.py --backend local|s3 --seconds 120 --producers 4 --workers 8
        [--schedulers 3] [--kill-min 0.5 --kill-max 2] [--error-rate 0.05]
        [--landed-error-rate 0.02] [--lost-response-rate 0.02] [--latency-ms 5] [--seed 1]
        [--no-poison] [--poison-min 0.3 --poison-max 1.5] [--keep]

Prints the headline counts on stderr and one JSON report on stdout (``summary`` holds
the headline counts); exit status 0 when no invariant was broken, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # chaos_procs (spawn inherits sys.path)

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def main() -> int:
    import chaos_procs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["local", "s3"], default="local")
    p.add_argument("--seconds", type=float, default=120.0, help="how long the producers submit")
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kill-min", type=float, default=0.5, help="seconds between kills: at least")
    p.add_argument("--kill-max", type=float, default=2.0, help="seconds between kills: at most")
    p.add_argument("--error-rate", type=float, default=0.05)
    p.add_argument("--landed-error-rate", type=float, default=0.02)
    p.add_argument("--lost-response-rate", type=float, default=0.02)
    p.add_argument("--latency-ms", type=float, default=5.0, help="each request waits 0..this")
    p.add_argument("--key-pool", type=int, default=40, help="idempotency keys shared by the producers")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--schedulers", type=int, default=3, help="scheduler processes (0: no schedule)")
    p.add_argument("--no-poison", action="store_true", help="plant no poison objects")
    p.add_argument("--poison", default="all", help="the poison kinds to plant: comma-separated kinds or "
                   "prefixes (task, worker, schedule, limit-def, limit-state, task-brace, ...)")
    p.add_argument("--poison-min", type=float, default=0.3, help="seconds between poison objects: at least")
    p.add_argument("--poison-max", type=float, default=1.5, help="seconds between poison objects: at most")
    p.add_argument("--no-limited", action="store_true", help="no rate-limited task type")
    p.add_argument("--pause", type=float, default=0.03, help="a producer waits 0..this between submits")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, local store)")
    p.add_argument("--shards", type=int, default=1, help="lay the queue out in this many shards (qo layout set)")
    args = p.parse_args()

    faults = dict(error_rate=args.error_rate, landed_error_rate=args.landed_error_rate,
                  lost_response_rate=args.lost_response_rate, latency=(0.0, args.latency_ms / 1000))
    work = tempfile.mkdtemp(prefix="qo-chaos-", dir=args.tmpdir)
    server = None
    try:
        if args.backend == "s3":
            from qo.testing.moto import MotoServer

            server = MotoServer()
            server.start()
            url = server.new_bucket(prefix="chaos")
        else:
            url = os.path.join(work, "store")
        t0 = time.monotonic()
        report = chaos_procs.run_chaos(
            url, os.path.join(work, "logs"), seconds=args.seconds, producers=args.producers,
            workers=args.workers, kill_every=(args.kill_min, args.kill_max), faults=faults,
            seed=args.seed, key_pool=args.key_pool, schedulers=args.schedulers, poison=False if args.no_poison else args.poison,
            poison_every=(args.poison_min, args.poison_max), limited=not args.no_limited, pause=args.pause,
            drain_timeout=args.drain_timeout, shards=args.shards, say=lambda s: print(s, file=sys.stderr))
        report.update(backend=args.backend, shards=args.shards,
                      wall_seconds=round(time.monotonic() - t0, 1), faults=faults,
                      work_dir=work if args.keep else None)
        print(json.dumps(report, indent=1, sort_keys=True))
        print_summary(report, args)
        return 1 if report["problems"] else 0
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


HEADLINES = [
    ("tasks_submitted", "tasks submitted (distinct ids returned to producers)"),
    ("ticks_fired", "schedule fires (tick tasks)"),
    ("completed", "tasks completed"),
    ("lost", "tasks lost (returned to a producer, not there)"),
    ("not_completed", "good tasks not completed"),
    ("left_running_without_live_lease", "left running without a live lease"),
    ("completed_twice_without_kill", "run twice when no kill interrupted them"),
    ("double_schedule_fires", "double schedule fires"),
    ("every_good_task_completed", "every good task completed"),
    ("kills_workers", "SIGKILLs of workers"),
    ("kills_schedulers", "SIGKILLs of schedulers"),
    ("poison_planted", "poison objects planted"),
    ("poison_reported_unreadable", "poison objects reported unreadable"),
    ("poison_must_be_reported", "poison objects the run is bound to read"),
    ("poison_must_missed", "of those, never reported"),
]


def print_summary(report: dict, args: argparse.Namespace) -> None:
    s = report["summary"]
    inj = report.get("injected", {})
    out = sys.stderr
    print(f"\n{args.backend}: {report['chaos_seconds']}s of chaos, {report['drain_seconds']}s drain", file=out)
    for key, label in HEADLINES:
        print(f"  {label:<55} {s.get(key)}", file=out)
    print(f"  {'injected faults (error / landed / lost response)':<55} "
          f"{inj.get('error', 0)} / {inj.get('landed_error', 0)} / {inj.get('lost_response', 0)}", file=out)
    print(f"  {'problems':<55} {len(report['problems'])}", file=out)
    for line in report["problems"][:20]:
        print(f"    {line}", file=out)


if __name__ == "__main__":
    sys.exit(main())
