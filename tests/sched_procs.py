"""Scheduler processes for multi-process tests (module-level so 'spawn' can pickle them)."""

from __future__ import annotations

import asyncio
import time


class ScaledClock:
    """Simulated time running ``speed`` times faster than real time from a shared origin,
    so separate processes agree on 'now' without talking to each other."""

    def __init__(self, base: float, t0: float, speed: float):
        self.base, self.t0, self.speed = base, t0, speed

    def now(self) -> float:
        return self.base + (time.time() - self.t0) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)


def run_scaled_scheduler(url: str, queue: str, base: float, t0: float, speed: float, stop_at: float) -> dict:
    """Run a Scheduler on a scaled clock until simulated time ``stop_at``."""
    import qo
    from qo.scheduler import Scheduler

    async def main() -> dict:
        clock = ScaledClock(base, t0, speed)
        q = await qo.connect(url, queue=queue, clock=clock)
        stop = asyncio.Event()
        scheduler = Scheduler(q, poll_max=1.0, jitter=0.2)

        async def stopper() -> None:
            await clock.sleep(stop_at - clock.now())
            stop.set()

        timer = asyncio.create_task(stopper())
        stats = await scheduler.run(stop)
        timer.cancel()
        await q.close()
        return dict(stats)

    return asyncio.run(main())
