"""Worker processes for rate-limit tests, on a shared sped-up clock."""

from __future__ import annotations

import asyncio
import os


def run_limited_worker(url: str, queue: str, clock_args: tuple, log_path: str, hold: float = 0.0,
                       concurrency: int = 4) -> dict:
    """Run until idle; log '<task id> <type> <start> <end> <pid> <claimed>' per execution
    (clock time; claimed: the claim's time, before the task's token was taken)."""
    import qo
    from qo.clock import ScaledClock
    from qo.worker import Worker

    async def main() -> dict:
        clock = ScaledClock(*clock_args)
        q = await qo.connect(url, queue=queue, clock=clock)
        # a lease of 60 clock seconds is 12 real ones on the 5x clock: no worker dies here,
        # and a record write took 3 s on a loaded machine (the default 30 left 6 s)
        worker = Worker(q, concurrency=concurrency, poll_min=0.1, poll_max=1.0, sweep_interval=2.0,
                        limits_refresh=1.0, buffer_max_age=0.5, lease_ttl=60.0)

        async def handler(input, ctx):
            start = clock.now()
            if hold:
                await clock.sleep(hold)
            with open(log_path, "a") as f:
                f.write(f"{ctx.task.id} {ctx.task.task_type} {start:.4f} {clock.now():.4f} {os.getpid()} "
                        f"{ctx.task.started_at:.4f}\n")

        for t in ("limited", "free", "a", "b"):
            worker.handler(t)(handler)
        stats = await worker.run(until_idle=True)
        await q.close()
        return dict(stats)

    return asyncio.run(main())
