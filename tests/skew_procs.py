"""Worker processes on a machine whose clock is off (tests/test_clock_skew.py).

Each replaces ``time.time`` before it imports qo: its local clock is real time plus a
skew it reads from a file, so the test can set it 2 minutes ahead or behind, or jump it
an hour while the worker runs. Everything of qo that reads the local clock (the queue's
``SystemClock``, the S3 or Azure backend's timing of the Date header) sees the skewed one.
"""

from __future__ import annotations

import json
import os
import threading


def _skew_local_clock(skew_path: str):
    """Make ``time.time`` real time + the skew in ``skew_path`` (re-read every 20 ms);
    returns the real clock."""
    import time

    real, real_sleep = time.time, time.sleep
    state = {"skew": float(open(skew_path).read())}

    def follow() -> None:
        while True:
            real_sleep(0.02)
            try:
                state["skew"] = float(open(skew_path).read())
            except (OSError, ValueError):  # being rewritten
                pass

    threading.Thread(target=follow, daemon=True).start()
    time.time = lambda: real() + state["skew"]
    return real


def run_skewed_worker(url: str, queue: str, skew_path: str, log_path: str, stop_path: str,
                      lease_ttl: float, hold: float) -> None:
    """A worker and a scheduler on a skewed local clock, until ``stop_path`` exists.

    Logs one JSON line per handler run (``run``: type, task id, attempt, real start and
    end) and every 50 ms its clock (``clock``: real time, the queue's ``clock.now()``,
    the local clock, the storage's ``clock_offset``)."""
    real = _skew_local_clock(skew_path)
    import asyncio
    import time

    import qo
    from qo.scheduler import Scheduler
    from qo.worker import Worker

    def write(**line) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **line}) + "\n")

    async def main() -> None:
        q = await qo.connect(url, queue=queue)
        worker = Worker(q, concurrency=4, lease_ttl=lease_ttl, sweep_interval=0.2, poll_min=0.02, poll_max=0.1,
                        limits_refresh=0.2, buffer_max_age=0.3, queue_settings_refresh=0.5, shutdown_timeout=10.0)

        def recorder(kind: str):
            async def handler(input, ctx):
                start = real()
                if kind == "hold":
                    await asyncio.sleep(hold)
                write(run=kind, task=ctx.task.id, attempt=ctx.task.attempt, start=start, end=real(),
                      input=input)
            return handler

        for kind in ("hold", "limited", "tick"):
            worker.handler(kind)(recorder(kind))
        stop = asyncio.Event()

        async def report() -> None:
            while not getattr(q.storage, "clock_offset", 0.0) and not os.path.exists(stop_path):
                await asyncio.sleep(0.01)  # from the first response on: before it, no clock but the local one
            while not stop.is_set():
                write(clock=q.clock.now(), real=real(), local=time.time(),
                      offset=float(getattr(q.storage, "clock_offset", 0.0) or 0.0))
                if os.path.exists(stop_path):
                    stop.set()
                    worker.stop()
                await asyncio.sleep(0.05)

        await asyncio.gather(worker.run(), Scheduler(q, poll_max=0.1, jitter=0.02).run(stop), report())
        await q.close()

    asyncio.run(main())
