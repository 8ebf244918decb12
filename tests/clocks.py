"""A queue on a fake clock that runs faster than real time, for tests of time."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import qo
from qo.clock import FakeClock


@contextlib.asynccontextmanager
async def ticking_queue(url: str, name: str, *, speed: float = 10.0,
                        start: float = 1_800_000_000.0) -> AsyncIterator[tuple[qo.Queue, FakeClock]]:
    """Yield ``(queue, clock)``; a background task moves the clock ``speed`` x real time."""
    clock = FakeClock(start)
    q = await qo.connect(url, queue=name, clock=clock)

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.005)
            clock.advance(0.005 * speed)

    ticker = asyncio.create_task(tick())
    try:
        yield q, clock
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await q.close()
