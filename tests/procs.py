"""Worker processes for multi-process tests (module-level so 'spawn' can pickle them)."""

from __future__ import annotations

import asyncio
import os
import time


def _settings(**overrides):
    from qo.worker import WorkerSettings

    base = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)
    base.update(overrides)
    return WorkerSettings(**base)


def run_counting_worker(url: str, queue: str, log_dir: str, concurrency: int = 4, pause: float = 0.0) -> dict:
    """Run a worker until idle; every execution appends '<task id>\\n' to a per-process
    log (after ``pause`` seconds: a slower handler lets late starters join in)."""
    import qo
    from qo.worker import Worker

    async def main() -> dict:
        q = await qo.connect(url, queue=queue)
        worker = Worker(q, settings=_settings(concurrency=concurrency))
        path = os.path.join(log_dir, f"ran-{os.getpid()}.log")

        @worker.handler("count")
        async def count(input, ctx):
            if pause:
                await asyncio.sleep(pause)
            with open(path, "a") as f:
                f.write(ctx.task.id + "\n")
            return input

        stats = await worker.run(until_idle=True)
        await q.close()
        return dict(stats)

    return asyncio.run(main())


def run_start_logging_worker(url: str, queue: str, log_dir: str, concurrency: int, pause: float,
                             heartbeat_interval: float) -> dict:
    """Run a worker until idle; every execution appends '<task id>\\n' to a per-process
    log as it starts (before ``pause``): what ran at all, even if asked to stop."""
    import qo
    from qo.worker import Worker

    async def main() -> dict:
        q = await qo.connect(url, queue=queue)
        worker = Worker(q, settings=_settings(concurrency=concurrency, heartbeat_interval=heartbeat_interval))
        path = os.path.join(log_dir, f"ran-{os.getpid()}.log")

        @worker.handler("count")
        async def count(input, ctx):
            with open(path, "a") as f:
                f.write(ctx.task.id + "\n")
            await asyncio.sleep(pause)
            return input

        stats = await worker.run(until_idle=True)
        await q.close()
        return dict(stats)

    return asyncio.run(main())


def run_sleepy_worker(url: str, queue: str, marker_file: str, lease_ttl: float) -> None:
    """A worker whose handler announces it started, then sleeps far longer than any test."""
    import qo
    from qo.worker import Worker

    async def main() -> None:
        q = await qo.connect(url, queue=queue)
        worker = Worker(q, settings=_settings(concurrency=1, lease_ttl=lease_ttl))

        @worker.handler("sleepy")
        async def sleepy(input, ctx):
            with open(marker_file, "w") as f:
                f.write(f"{os.getpid()} {ctx.attempt}\n")
            await asyncio.sleep(3600)

        await worker.run()

    asyncio.run(main())


def run_until_signal(url: str, queue: str, started_file: str, handler_seconds: float) -> None:
    """A worker run() until SIGTERM; its handler takes ``handler_seconds``."""
    import qo
    from qo.worker import Worker

    async def main() -> None:
        q = await qo.connect(url, queue=queue)
        worker = Worker(q, settings=_settings(concurrency=2, shutdown_timeout=0.3))

        @worker.handler("job")
        async def job(input, ctx):
            with open(started_file, "a") as f:
                f.write(f"{ctx.task.id}\n")
            await asyncio.sleep(handler_seconds)
            return "done"

        stats = await worker.run()
        with open(started_file + ".stats", "w") as f:
            f.write(repr(dict(stats)))
        await q.close()

    asyncio.run(main())


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path) as f:
                return f.read()
        time.sleep(0.02)
    raise TimeoutError(path)


def run_pack_victim(url: str, queue: str, log_path: str, lease_ttl: float) -> None:
    """A worker whose ``step`` tasks below 20 end at once and the others hang: killed
    mid-pack by the test. Each start appends the task id to ``log_path``."""
    import qo
    from qo.worker import Worker

    async def main() -> None:
        q = await qo.connect(url, queue=queue)
        worker = Worker(q, settings=_settings(concurrency=4, lease_ttl=lease_ttl, aging=False))

        @worker.handler("step")
        async def step(input, ctx):
            with open(log_path, "a") as f:
                f.write(ctx.task.id + "\n")
            if input >= 20:
                await asyncio.sleep(3600)
            return input

        await worker.run()

    asyncio.run(main())


def wait_for_lines(path: str, n: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().split()
            if len(lines) >= n:
                return lines
        time.sleep(0.02)
    raise TimeoutError(f"{path}: fewer than {n} lines")


def set_layout(url: str, queue: str, shards: int) -> int | str:
    """Record a layout of ``shards`` for ``queue``: the shard count recorded, or the
    refusal's message when another process recorded another layout first."""
    import qo
    from qo.errors import InvalidInput

    async def main() -> int | str:
        q = await qo.connect(url, queue=queue)
        try:
            return (await q.set_layout(shards)).shards
        except InvalidInput as exc:
            return exc.message
        finally:
            await q.close()

    return asyncio.run(main())
