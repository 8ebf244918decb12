"""Make docs/img/dashboard.png: a real queue, a real worker, the real dashboard.

    python plugins/qo-dashboard/tools/screenshot.py [--minutes 4] [--out docs/img/dashboard.png]

A producer submits a few tasks a second (about one in twenty fails) to a local store, a
worker runs them, and the overview stays open in headless Chromium (/usr/bin/chromium)
for the given minutes, refreshing itself: the chart's bars are what it saw. Then a
full-page screenshot, palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

import qo
from qo.counting import CountingStorage
from qo.worker import WorkerSettings
from qo_dashboard import create_app

ROOT = Path(__file__).resolve().parents[3]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


async def main(minutes: float, out: Path) -> None:
    from playwright.async_api import async_playwright

    store = tempfile.mkdtemp(prefix="qo-shot-")
    queue = await qo.connect(store, queue="emails", wrap_storage=CountingStorage)
    producer_q = await qo.connect(store, queue="emails")
    worker_q = await qo.connect(store, queue="emails")
    await producer_q.schedules.add("nightly-digest", cron="0 3 * * *", task_type="digest", timezone="Europe/Paris")
    await producer_q.limits.set("task_type:send_email", rate=20, per=1.0, burst=40)
    worker = qo.Worker(worker_q, concurrency=4, settings=WorkerSettings(poll_max=0.5))

    @worker.handler("send_email")
    async def send_email(input: Any, ctx: Any) -> Any:
        await asyncio.sleep(random.uniform(0.05, 0.4))
        if input["n"] % 20 == 7:
            raise qo.Fail(f"mailbox {input['to']} does not exist")
        return {"sent": True}

    @worker.handler("render_video")
    async def render(input: Any, ctx: Any) -> Any:
        await asyncio.sleep(random.uniform(2.0, 5.0))
        return {"ok": True}

    @worker.handler("resize_image")
    async def resize(input: Any, ctx: Any) -> Any:
        await asyncio.sleep(random.uniform(0.1, 0.6))
        return {"ok": True}

    async def produce() -> None:
        n = 0
        while True:
            n += 1
            kind = "send_email" if n % 3 else "resize_image"
            await producer_q.submit(kind, {"n": n, "to": f"user{n}@example.com"},
                                    priority=random.choice([128, 128, 128, 192, 64, 255]), max_retries=0)
            await asyncio.sleep(random.uniform(0.05, 0.5))

    app = create_app(queue, allow_actions=True, refresh=5.0)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    tasks = [asyncio.create_task(produce()), asyncio.create_task(worker.run())]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        await page.goto(f"http://127.0.0.1:{port}/")
        await asyncio.sleep(minutes * 60)
        # a backlog of slow tasks for the ready bands and the running column
        for i in range(40):
            await producer_q.submit("render_video", {"n": 1000 + i},
                                    priority=random.choice([255, 192, 128, 128, 128, 64, 0]))
        await asyncio.sleep(6)  # one more refresh
        out.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(out), full_page=True)
        await browser.close()
    tasks[0].cancel()
    worker.stop()
    await asyncio.wait_for(tasks[1], 30)
    await runner.cleanup()
    if shutil.which("pngquant"):  # optional: a palette of 128 colours keeps it small
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--output", str(out), "128", str(out)])
    print(out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    asyncio.run(main(args.minutes, args.out))
