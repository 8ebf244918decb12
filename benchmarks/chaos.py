"""qo's chaos run at any size: producers and workers (processes) on one bucket, storage
faults injected in every process, workers SIGKILLed at random and restarted; then a clean
drain and the invariants. The driver is tests/chaos_procs.py (the CI test runs it small).

    python benchmarks/chaos.py --backend local|s3 --seconds 120 --producers 4 --workers 8
        [--kill-min 0.5 --kill-max 2] [--error-rate 0.05] [--landed-error-rate 0.02]
        [--lost-response-rate 0.02] [--latency-ms 5] [--seed 1] [--no-scheduler] [--keep]

Prints one JSON report on stdout; exit status 0 when no invariant was broken, 1 otherwise.
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
    p.add_argument("--no-scheduler", action="store_true", help="no schedulers in the producers")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, local store)")
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
            seed=args.seed, key_pool=args.key_pool, scheduler=not args.no_scheduler,
            drain_timeout=args.drain_timeout, say=lambda s: print(s, file=sys.stderr))
        report.update(backend=args.backend, wall_seconds=round(time.monotonic() - t0, 1), faults=faults,
                      work_dir=work if args.keep else None)
        print(json.dumps(report, indent=1, sort_keys=True))
        return 1 if report["problems"] else 0
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
