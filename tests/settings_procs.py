"""Processes for the queue-settings tests (module-level so 'spawn' can pickle them)."""

from __future__ import annotations

import asyncio
import json
import os


def run_reporting_worker(url: str, queue: str, report: str, stop_file: str, own_poll_max: float) -> None:
    """A worker with its own (different) settings that appends its effective settings to
    ``report`` (a JSON line) whenever they change, until ``stop_file`` exists."""
    import qo
    from qo.worker import Worker, WorkerSettings

    async def main() -> None:
        q = await qo.connect(url, queue=queue)
        worker = Worker(q, settings=WorkerSettings(
            concurrency=2, poll_min=0.01, poll_max=own_poll_max, sweep_interval=0.2,
            queue_settings_refresh=0.2, aging=False))

        @worker.handler("noop")
        async def noop(input, ctx):
            return None

        async def watch() -> None:
            last = None
            while not os.path.exists(stop_file):
                s = worker.settings
                now = {"poll_max": s.poll_max, "aging": s.aging.enabled,
                       "aging_step_seconds": s.aging.step_seconds}
                if now != last:
                    with open(report, "a") as f:
                        f.write(json.dumps(now) + "\n")
                    last = now
                await asyncio.sleep(0.02)
            worker.stop()

        watcher = asyncio.create_task(watch())
        await worker.run()
        await watcher
        await q.close()

    asyncio.run(main())


def set_settings_repeatedly(url: str, queue: str, name: str, values: list) -> None:
    """Set ``name`` to each of ``values`` in turn (racing other processes doing the same)."""
    import qo

    async def main() -> None:
        q = await qo.connect(url, queue=queue)
        for v in values:
            await q.settings.set({name: v})
        await q.close()

    asyncio.run(main())
