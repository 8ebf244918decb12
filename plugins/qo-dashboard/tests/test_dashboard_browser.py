"""Real-browser tests: headless Chromium from Debian's packages (/usr/bin/chromium), driven
by playwright's Python package (nothing downloads a browser). They load the overview, open
a failed task and see its traceback, press retry and see it pending, pause a schedule, and
check that a task input of <script>alert(1)</script> does not run. Each page's full-page
screenshot goes to test-artifacts/dashboard/ at the repo root (QO_TEST_ARTIFACTS overrides).

Without chromium or playwright the tests skip, saying why; under CI=1 they fail instead
(``python3 dev.py`` installs both)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

import qo
from qo.worker import WorkerSettings
from qo_dashboard import create_app

from dashboard_helpers import FAST, run_worker, write_ended, write_worker

CHROMIUM = os.environ.get("QO_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
XSS = "<script>alert(1)</script>"
ARTIFACTS = Path(os.environ.get("QO_TEST_ARTIFACTS") or Path(__file__).resolve().parents[3] / "test-artifacts") \
    / "dashboard"


def _missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install 'qo-dashboard[test]'; python3 dev.py does)"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; python3 dev.py does as root)"
    return None


# one browser and one seeded dashboard for the module (the tests run in file order: the
# overview's counts come before the retry); everything on the module's event loop
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    why = _missing()
    if why:
        if os.environ.get("CI"):  # CI installs them (dev.py): a skip there would hide a broken install
            pytest.fail(why)
        pytest.skip(why)
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory) -> AsyncIterator[dict[str, Any]]:
    """A seeded queue (local) and its dashboard, actions on, on a free loopback port."""
    from qo.counting import CountingStorage

    queue = await qo.connect(str(tmp_path_factory.mktemp("dash") / "store"), queue="emails", wrap_storage=CountingStorage)
    for i in range(6):
        await queue.submit("ok", {"n": i})
    await queue.submit("boom", {"html": XSS})
    failed = await queue.submit("send_email", {"to": "a@example.com"}, max_retries=0)
    await run_worker(queue)
    worker = qo.Worker(queue, concurrency=1, settings=WorkerSettings(**FAST))

    @worker.handler("send_email")
    def send_email(input: Any, ctx: Any) -> Any:
        raise ConnectionError(f"SMTP server refused {input['to']}")

    await asyncio.wait_for(worker.run(until_idle=True), 30)
    await write_ended(queue, 4, "failed", "resize_image")
    for priority in (255, 200, 128, 128, 40):
        await queue.submit("send_email", {"to": "b@example.com"}, priority=priority)
    await queue.schedules.add("nightly-report", cron="0 3 * * *", task_type="report", timezone="Europe/Paris")
    await queue.schedules.add("every-5-min", cron="*/5 * * * *", task_type="poll")
    await queue.limits.set("task_type:send_email", rate=10, per=1.0, burst=20)
    await write_worker(queue, "host-a-4242-1f2e3d", completed=1250, failed=7,
                       requests={"GET": 3000, "PUT_COND": 2400, "LIST": 900},
                       requests_per_minute={"GET": 50.0, "PUT_COND": 40.0, "LIST": 15.0, "PUT": 20.0})
    await write_worker(queue, "host-b-977-a0b1c2", completed=980, failed=3)
    # qo.stats() passes each worker record's request counts on as "requests" and
    # "requests_per_minute" in workers newer than this branch; until then, do it here
    real_stats = queue.stats

    async def stats() -> dict[str, Any]:
        out = await real_stats()
        for w in out["workers"]:
            if w["worker_id"].startswith("host-a"):
                w.setdefault("requests", {"GET": 3000, "PUT_COND": 2400, "LIST": 900})
                w.setdefault("requests_per_minute", {"GET": 50.0, "PUT_COND": 40.0, "LIST": 15.0, "PUT": 20.0})
        return out

    queue.stats = stats  # type: ignore[method-assign]
    app = create_app(queue, allow_actions=True, refresh=1.0)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield {"url": f"http://127.0.0.1:{port}", "queue": queue, "failed": failed}
    finally:
        await runner.cleanup()
        await queue.close()


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def new_page(browser: Any) -> Any:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
    return page


async def test_overview_loads_and_refreshes(browser, site):
    page = await new_page(browser)
    await page.goto(site["url"] + "/")
    assert await page.title() == "Overview · emails · qo dashboard"
    card = page.locator("a.card.st-failed .value")
    assert (await card.inner_text()).strip() == "6"
    assert await page.locator("svg.chart rect.bad").count() >= 1
    assert "host-a-4242-1f2e3d" in await page.locator("section.panel").last.inner_text()
    # htmx swaps the fragment in place (every 1 s here): the counts follow the queue
    await site["queue"].submit("ok", {"n": 99})
    await page.locator("a.card.st-pending .value").filter(has_text="6").wait_for(timeout=5000)
    await shot(page, "overview")
    assert page.errors == []  # CSP blocked nothing the page needs; no script error


async def test_failed_task_traceback_then_retry(browser, site):
    page = await new_page(browser)
    await page.goto(site["url"] + "/dead-letters")
    await shot(page, "dead-letters")
    await page.click(f"a[href='/tasks/{site['failed'].id}']")
    await page.wait_for_url(f"**/tasks/{site['failed'].id}")
    trace = await page.locator("pre.trace").inner_text()
    assert "Traceback" in trace and "ConnectionError: SMTP server refused a@example.com" in trace
    await shot(page, "task-failed")
    await page.click("button:has-text('Retry')")
    await page.wait_for_url("**msg=retried*")
    assert "retried 1 task" in await page.locator(".flash").inner_text()
    assert (await page.locator("h1 .badge").inner_text()).strip() == "pending"
    assert (await site["queue"].get(site["failed"].id)).status == "pending"
    await shot(page, "task-retried")


async def test_pause_a_schedule(browser, site):
    page = await new_page(browser)
    await page.goto(site["url"] + "/schedules")
    row = page.locator("#schedule-nightly-report")
    await row.locator("button:has-text('Pause')").click()
    await page.wait_for_url("**msg=paused*")
    row = page.locator("#schedule-nightly-report")
    assert "paused" in await row.locator(".badge").first.inner_text()
    assert await row.locator("button:has-text('Resume')").count() == 1
    assert not (await site["queue"].schedules.get("nightly-report")).enabled
    await shot(page, "schedules")


async def test_script_input_does_not_run(browser, site):
    page = await new_page(browser)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
    tasks = [t async for t in site["queue"].list(status="failed", task_type="boom")]
    await page.goto(site["url"] + f"/tasks/{tasks[0].id}")
    assert XSS in await page.locator("pre.json").inner_text()  # shown as text
    await page.goto(site["url"] + "/dead-letters")
    await page.goto(site["url"] + "/tasks?type=boom")
    assert dialogs == []
    await shot(page, "tasks")


async def test_other_pages_render(browser, site):
    page = await new_page(browser)
    for path, name, text in (("/limits", "limits", "task_type:send_email"), ("/costs", "costs", "1 of 2 live workers report requests"),
                             ("/tasks?status=pending", "tasks-pending", "send_email")):
        await page.goto(site["url"] + path)
        assert text in await page.locator("main").inner_text()
        await shot(page, name)
    assert page.errors == []
