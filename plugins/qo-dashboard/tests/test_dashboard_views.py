"""Every page through aiohttp's test client, on local and S3: real content, filters,
pagination, actions, safety (read-only, CSRF, auth, escaping, bad parameters)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest

from qo.model import FAILED, PENDING

from dashboard_helpers import csrf_of, run_worker, write_worker

XSS = "<script>alert(1)</script>"


@pytest.fixture
async def seeded(queue) -> dict[str, Any]:
    """Completed, failed (one with a script as input), pending, delayed and blocked tasks,
    a schedule and a limit."""
    done = [await queue.submit("ok", {"n": i}) for i in range(3)]
    bad = await queue.submit("boom", {"n": 1})
    xss = await queue.submit("boom", {"html": XSS})
    await run_worker(queue)
    urgent = await queue.submit("later", {"x": 1}, priority=255)
    normal = await queue.submit("later", {"x": 2})
    parent = await queue.submit("later", {"x": 3}, schedule_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    child = await queue.submit("child", {"x": 4}, depends_on=[parent.id])
    await queue.schedules.add("nightly", cron="0 3 * * *", task_type="report", timezone="Europe/Paris")
    await queue.limits.set("task_type:later", rate=10, per=1.0, burst=20)
    await write_worker(queue, "w-live", completed=3, leases={urgent.id: {"lease": "l1", "type": "later"}})
    await write_worker(queue, "w-gone", alive=False, completed=7, failed=2)
    return {"done": done, "bad": bad, "xss": xss, "urgent": urgent, "normal": normal, "parent": parent,
            "child": child}


async def text(resp: Any, status: int = 200) -> str:
    body = await resp.text()
    assert resp.status == status, body[:500]
    return body


# -- pages -----------------------------------------------------------------------------


async def test_overview_counts_bands_workers_and_refresh_cost(client, seeded):
    html = await text(await client.get("/"))
    assert 'hx-get="/fragments/overview"' in html and 'hx-trigger="every 5.0s"' in html
    cards = dict(re.findall(r'<span class="label">([a-z ]+)</span>\s*<span class="value num">([0-9,+]+)</span>', html))
    assert cards["pending"] == "3" and cards["blocked"] == "1" and cards["dead letters"] == "2"
    bands = dict(re.findall(r"<tr><th>(\w+)</th>.*?<td class=\"num\">(\d+)</td></tr>", html))
    assert bands == {"critical": "1", "high": "0", "normal": "1", "low": "0", "background": "0"}
    assert "Oldest due task waits" in html
    # the next delayed task is due in an hour: 59 or 60 min, or 1.0 h when the server clock's
    # offset, re-estimated between the submit and the page, makes it a few ms over
    assert re.search(r"in (59 min|60 min|1\.0 h)</strong>", html)
    assert "1 live of 2" in html
    live = re.search(r'<td class="mono">w-live</td>.*?</tr>', html, re.S).group(0)
    cells = re.findall(r'<td class="num r">([^<]+)</td>', live)
    assert "st-running\">live<" in live and re.match(r"\d+(\.\d)? s ago", cells[0]) and cells[1:] == ["1", "3", "0"]
    gone = re.search(r'<td class="mono">w-gone</td>.*?</tr>', html, re.S).group(0)
    assert "stale" in gone and "2.0 min ago" in gone or "120 s" in gone or "2 min ago" in gone
    assert re.search(r"each refresh: \d+ requests to the store, ~\d+/min", html)
    frag = await text(await client.get("/fragments/overview"))
    assert "<html" not in frag and "dead letters" in frag
    assert re.search(r"failed <span class=\"num\">2</span>", frag)  # the chart: 2 failed in the last hour


async def test_tasks_filters_and_links(client, seeded):
    html = await text(await client.get("/tasks?status=failed"))
    assert html.count('<span class="badge st-failed">failed</span>') == 2
    assert f'href="/tasks/{seeded["bad"].id}"' in html
    html = await text(await client.get("/tasks?status=pending&type=later"))
    assert f'/tasks/{seeded["urgent"].id}"' in html and f'/tasks/{seeded["parent"].id}"' in html
    assert f'/tasks/{seeded["child"].id}"' not in html
    html = await text(await client.get("/tasks?status=blocked"))
    assert f'/tasks/{seeded["child"].id}"' in html
    html = await text(await client.get("/tasks?status=completed"))
    assert html.count('st-completed">completed<') == 3
    html = await text(await client.get("/tasks"))  # any status, newest first
    ids = re.findall(r'href="/tasks/([0-9a-f]{24})"', html)
    assert ids[0] == seeded["child"].id and len(ids) == 9 and ids == sorted(ids, reverse=True)
    html = await text(await client.get("/tasks?type=ok&since=1h"))
    assert len(re.findall(r'href="/tasks/([0-9a-f]{24})"', html)) == 3


async def test_tasks_pagination_newest_first(client, seeded):
    seen: list[str] = []
    url = "/tasks?limit=2"
    for _ in range(10):
        html = await text(await client.get(url))
        seen += re.findall(r'href="/tasks/([0-9a-f]{24})" title', html)
        more = re.search(r'<a href="([^"]+)" rel="next">', html)
        if not more:
            break
        url = more.group(1).replace("&amp;", "&")
    assert len(seen) == 9 and len(set(seen)) == 9 and seen == sorted(seen, reverse=True)
    # the dead letters page by page too
    html = await text(await client.get("/dead-letters?limit=1"))
    first = re.findall(r'href="/tasks/([0-9a-f]{24})" title', html)
    nxt = re.search(r'<a href="([^"]+)" rel="next">', html).group(1).replace("&amp;", "&")
    second = re.findall(r'href="/tasks/([0-9a-f]{24})" title', await text(await client.get(nxt)))
    assert {*first, *second} == {seeded["bad"].id, seeded["xss"].id}


async def test_task_page_shows_error_traceback_dependencies(client, seeded):
    html = await text(await client.get(f"/tasks/{seeded['bad'].id}"))
    assert "Last error" in html and "cannot handle" in html and "Fail" in html
    assert "attempts</dt><dd class=\"num\">1 of 4" in html
    parent = await text(await client.get(f"/tasks/{seeded['parent'].id}"))
    assert f'href="/tasks/{seeded["child"].id}"' in parent  # dependents as links
    child = await text(await client.get(f"/tasks/{seeded['child'].id}"))
    assert f'href="/tasks/{seeded["parent"].id}"' in child and "waiting" in child
    urgent = await text(await client.get(f"/tasks/{seeded['urgent'].id}"))
    assert "priority</dt><dd class=\"num\">255" in urgent
    missing = await client.get("/tasks/" + "0" * 24)
    assert missing.status == 404


async def test_task_with_a_traceback(client, queue):
    import qo
    from qo.worker import WorkerSettings

    task = await queue.submit("raises", {"n": 1}, max_retries=0)
    worker = qo.Worker(queue, concurrency=1, settings=WorkerSettings(poll_min=0.01, poll_max=0.05))

    @worker.handler("raises")
    def raises(input, ctx):
        raise ValueError("the input is wrong")

    await worker.run(until_idle=True)
    html = await text(await client.get(f"/tasks/{task.id}"))
    assert '<pre class="trace">' in html and "Traceback" in html and "ValueError: the input is wrong" in html


async def test_schedule_origin_on_task_page(client, seeded, queue):
    """The task a schedule fired last names that schedule (found from the schedule's
    ``last_task_id``: the task itself does not record its origin)."""
    store = queue.schedules.store
    schedule, etag = await store.load("nightly")
    schedule.last_task_id = seeded["normal"].id  # as a scheduler's fire writes it
    await store.replace(schedule, etag)
    html = await text(await client.get(f"/tasks/{seeded['normal'].id}"))
    assert re.search(r'<dt>schedule</dt><dd><a href="/schedules">nightly</a>', html)
    html = await text(await client.get(f"/tasks/{seeded['urgent'].id}"))
    assert "<dt>schedule</dt><dd><span class=\"muted\">" in html
    assert f'href="/tasks/{seeded["normal"].id}"' in await text(await client.get("/schedules"))


async def test_schedules_limits_costs_pages(client, seeded):
    html = await text(await client.get("/schedules"))
    assert "nightly" in html and "0 3 * * *" in html and "Europe/Paris" in html and "active" in html
    html = await text(await client.get("/limits"))
    assert "task_type:later" in html and ">20<" in html and "10/s" in html
    html = await text(await client.get("/costs"))
    assert "aws.amazon.com/s3/pricing" in html and "2026-11-29" in html
    assert re.search(r'<td class="mono">LIST</td><td class="num r">\$0.0050</td>\s*<td class="num r">[1-9]', html)


async def test_costs_from_worker_request_fields(make_client, queue):
    """Workers that report requests (``requests_per_minute`` in stats) are priced; older
    workers (no such field) show as not reported."""
    client = await make_client()
    stats = {"workers": [
        {"worker_id": "w-new", "alive": True, "requests": {"GET": 600, "LIST": 100},
         "requests_per_minute": {"GET": 60.0, "LIST": 10.0, "PUT_COND": 5.0}},
        {"worker_id": "w-old", "alive": True},
    ]}

    async def fake_stats():
        return {**await real(), **stats}

    real = queue.stats
    queue.stats = fake_stats
    try:
        html = await text(await client.get("/costs"))
    finally:
        del queue.stats
    assert "1 of 2 live workers report requests" in html
    assert '<td class="mono">GET</td><td class="num r">$0.0004</td>' in html
    assert re.search(r"<td class=\"mono\">GET</td>.*?<td class=\"num r\">60.0</td>", html, re.S)
    # 60 GET/min * 43200 min * 0.0004/1000 + (10 LIST + 5 PUT_COND)/min * 43200 * 0.005/1000
    assert "$4.28" in html
    assert "not reported" in html


# -- actions ---------------------------------------------------------------------------


async def test_retry_one_and_many_dead_letters(client, seeded, queue):
    page = await text(await client.get("/dead-letters"))
    assert "Retry selected" in page
    csrf = csrf_of(page)
    resp = await client.post("/actions/retry", data={"csrf": csrf, "id": seeded["bad"].id, "back": "/dead-letters"},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/dead-letters?msg=retried")
    assert (await queue.get(seeded["bad"].id)).status == PENDING
    assert (await queue.get(seeded["xss"].id)).status == FAILED
    resp = await client.post("/actions/retry", data={"csrf": csrf, "all": "failed", "back": "/dead-letters"})
    html = await text(resp)
    assert "retried 1 failed task" in html and "No task matches" in html
    assert (await queue.get(seeded["xss"].id)).status == PENDING


async def test_cancel_selected(client, seeded, queue):
    csrf = csrf_of(await text(await client.get("/tasks?status=pending")))
    data = [("csrf", csrf), ("id", seeded["urgent"].id), ("id", seeded["normal"].id), ("id", seeded["bad"].id),
            ("back", "/tasks?status=pending")]
    html = await text(await client.post("/actions/cancel", data=data))
    assert "cancelled 3 tasks" in html  # a dead letter among them is given up (cancelled)
    assert (await queue.get(seeded["urgent"].id)).status == "cancelled"
    assert (await queue.get(seeded["bad"].id)).status == "cancelled"
    html = await text(await client.post("/actions/cancel", data=data))  # all ended now: nothing to do
    assert "cancelled 0 tasks; 3 skipped" in html


async def test_pause_resume_trigger_schedule(client, seeded, queue):
    csrf = csrf_of(await text(await client.get("/schedules")))
    html = await text(await client.post("/schedules/nightly/pause", data={"csrf": csrf}))
    assert "paused nightly" in html and "st-paused" in html
    assert not (await queue.schedules.get("nightly")).enabled
    await text(await client.post("/schedules/nightly/resume", data={"csrf": csrf}))
    assert (await queue.schedules.get("nightly")).enabled
    html = await text(await client.post("/schedules/nightly/trigger", data={"csrf": csrf}))
    task_id = re.search(r"triggered nightly: task ([0-9a-f]{24})", html).group(1)
    assert (await queue.get(task_id)).task_type == "report"


# -- safety ----------------------------------------------------------------------------


async def test_read_only_by_default(make_client, seeded, queue):
    client = await make_client()
    html = await text(await client.get("/dead-letters"))
    assert "Retry selected" not in html and 'type="checkbox"' not in html and "read-only" in html
    csrf = csrf_of(await text(await (await make_client(allow_actions=True)).get("/schedules")))
    for path in ("/actions/retry", "/actions/cancel", "/schedules/nightly/pause"):
        resp = await client.post(path, data={"csrf": csrf, "id": seeded["bad"].id})
        assert resp.status == 403, path
    assert (await queue.get(seeded["bad"].id)).status == FAILED
    assert (await queue.schedules.get("nightly")).enabled


async def test_csrf_required(client, seeded, queue):
    for data in ({"id": seeded["bad"].id}, {"id": seeded["bad"].id, "csrf": "0" * 64}):
        resp = await client.post("/actions/retry", data=data)
        assert resp.status == 403 and "CSRF" in await resp.text()
    assert (await queue.get(seeded["bad"].id)).status == FAILED
    csrf = csrf_of(await text(await client.get("/dead-letters")))
    resp = await client.post("/actions/retry", data={"id": seeded["bad"].id}, headers={"X-CSRF-Token": csrf},
                             allow_redirects=False)
    assert resp.status == 303


async def test_auth_token_bearer_and_login(make_client, seeded):
    client = await make_client(auth_token="s3cret")
    resp = await client.get("/tasks", headers={"Accept": "application/json"})
    assert resp.status == 401 and "s3cret" not in await resp.text()
    resp = await client.get("/tasks", headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/login")
    assert (await client.get("/", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/", headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await client.get("/static/dashboard.css")).status == 200  # static needs nothing
    resp = await client.post("/login", data={"token": "nope", "next": "/tasks"}, allow_redirects=False)
    assert resp.status == 401
    resp = await client.post("/login", data={"token": "s3cret", "next": "https://evil.example/"},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
    assert (await client.get("/tasks")).status == 200  # the cookie jar now holds the login


async def test_security_headers(client, seeded):
    resp = await client.get("/")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["X-Content-Type-Options"] == "nosniff"
    html = await resp.text()
    assert "<script>" not in html and not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert " style=" not in html and "<style" not in html
    assert (await client.get("/tasks?status=bogus")).headers["X-Frame-Options"] == "DENY"


async def test_input_is_escaped(client, seeded):
    html = await text(await client.get(f"/tasks/{seeded['xss'].id}"))
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    listing = await text(await client.get("/dead-letters"))
    assert XSS not in listing and "alert(1)" in listing  # the error message quotes the input, escaped


async def test_store_url_credentials_never_shown(tmp_path):
    from qo_dashboard.app import create_app

    class Fake:
        name, url, storage = "q", "s3://AKIAXXX:topsecret@bucket/p?token=abc", object()
        clock = None

    from qo_dashboard.state import STATE

    app = create_app(Fake())
    assert app[STATE]["store_label"] == "s3://bucket/p?token=..."


@pytest.mark.parametrize("query, field", [
    ("/tasks?status=bogus", "status"), ("/tasks?limit=-1", "limit"), ("/tasks?limit=x", "limit"),
    ("/tasks?limit=1000", "limit"), ("/tasks?type=a%20b", "type"), ("/tasks?since=yesterday", "since"),
    ("/tasks?status=failed&after=zz/../x", "after"), ("/tasks?status=failed&after=q/tasks/x", "after"),
    ("/dead-letters?limit=0", "limit"), ("/tasks/not-an-id", "id"),
])
async def test_bad_parameters_answer_400(client, query, field):
    resp = await client.get(query)
    assert resp.status == 400
    assert f"bad parameter {field}" in await resp.text()


async def test_bad_action_parameters_answer_400(client, seeded):
    csrf = csrf_of(await text(await client.get("/dead-letters")))
    resp = await client.post("/actions/retry", data={"csrf": csrf, "id": "../etc"})
    assert resp.status == 400 and "bad parameter id" in await resp.text()
    resp = await client.post("/schedules/nightly/explode", data={"csrf": csrf})
    assert resp.status == 400 and "bad parameter action" in await resp.text()
