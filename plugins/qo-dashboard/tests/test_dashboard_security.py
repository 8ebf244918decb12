"""The dashboard against a hostile page and a hostile link (issue 26, items 4-7), on local
and S3: DNS rebinding (the Host check, the Origin check, a CSRF token per browser), open
redirects from login's next= and the actions' back=, guessing the auth token, and flash
text taken from the URL."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from yarl import URL

from qo.model import FAILED, PENDING
from qo_dashboard.hosts import HostRule
from qo_dashboard.logins import LoginLimiter
from qo_dashboard.security import BROWSER_COOKIE

from dashboard_helpers import csrf_of, run_worker


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def failed_task(queue) -> Any:
    """A dead letter (a task that failed for good) and a schedule to pause."""
    task = await queue.submit("boom", {"n": 1})
    await run_worker(queue)
    assert (await queue.get(task.id)).status == FAILED
    await queue.schedules.add("nightly", cron="0 3 * * *", task_type="report")
    return task


async def ok(resp: Any, status: int = 200) -> str:
    body = await resp.text()
    assert resp.status == status, body[:300]
    return body


def flash_of(html: str) -> str | None:
    match = re.search(r'<p class="flash"[^>]*>(.*?)</p>', html, re.S)
    return match.group(1) if match else None


# -- 4. DNS rebinding: Host, Origin, one CSRF token per browser ---------------------------


async def test_a_foreign_host_is_misdirected(client, failed_task):
    port = client.port
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", f"127.0.0.1.evil.example:{port}",
                 "attacker", "", "localhost:x", "[::1", "localhost:99999", "user@127.0.0.1"):
        for path in ("/", "/tasks", f"/tasks/{failed_task.id}", "/static/dashboard.css", "/nowhere"):
            resp = await client.get(path, headers={"Host": host}, allow_redirects=False)
            body = await resp.text()
            assert resp.status == 421, (host, path, resp.status)
            assert resp.content_type == "text/plain" and len(body) < 300 and "\n" == body[-1]
            assert failed_task.id not in body and "Set-Cookie" not in resp.headers
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "[::1]"):
        assert (await client.get("/", headers={"Host": host})).status == 200, host


async def test_a_rebound_post_is_refused_before_anything_changes(client, failed_task, queue):
    """The audit's probe: a foreign Host and Origin with a valid token (it answered 303 and
    the task went to pending). Then the right Host with another site's Origin or fetch
    metadata; then the dashboard's own form, which still works."""
    csrf = csrf_of(await ok(await client.get("/dead-letters")))
    port = client.port
    form = {"csrf": csrf, "id": failed_task.id, "back": "/dead-letters"}
    evil = f"evil.example:{port}"
    resp = await client.post("/actions/retry", data=form, headers={"Host": evil, "Origin": f"http://{evil}"},
                             allow_redirects=False)
    assert resp.status == 421
    assert (await queue.get(failed_task.id)).status == FAILED
    for headers in ({"Origin": f"http://{evil}"}, {"Origin": "http://evil.example"},
                    {"Origin": f"http://127.0.0.1:{port + 1}"}, {"Origin": f"http://localhost:{port}"},
                    {"Origin": "null"}, {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
                    {"Origin": "garbage"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        for path, data in (("/actions/retry", form), ("/actions/cancel", form), ("/schedules/nightly/pause", form)):
            resp = await client.post(path, data=data, headers=headers, allow_redirects=False)
            assert resp.status == 403 and "another site" in await resp.text(), (headers, path)
        assert (await queue.get(failed_task.id)).status == FAILED, headers
        assert (await queue.schedules.get("nightly")).enabled, headers
    resp = await client.post("/actions/retry", data=form, allow_redirects=False,
                             headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})
    assert resp.status == 303
    assert (await queue.get(failed_task.id)).status == PENDING


async def test_login_from_another_site_is_refused(make_client):
    client = await make_client(auth_token="s3cret")
    resp = await client.post("/login", data={"token": "s3cret"}, headers={"Origin": "http://evil.example"},
                             allow_redirects=False)
    assert resp.status == 403 and "Set-Cookie" not in resp.headers


async def test_the_csrf_token_belongs_to_one_browser(client, failed_task, queue):
    resp = await client.get("/dead-letters")
    cookie = resp.cookies[BROWSER_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    first = csrf_of(await ok(resp))
    assert csrf_of(await ok(await client.get("/dead-letters"))) == first  # the same browser: the same token
    assert "Set-Cookie" not in (await client.get("/dead-letters")).headers  # set once
    client.session.cookie_jar.clear()  # another browser
    second = csrf_of(await ok(await client.get("/dead-letters")))
    assert second != first
    form = {"id": failed_task.id, "back": "/dead-letters"}
    resp = await client.post("/actions/retry", data={**form, "csrf": first}, allow_redirects=False)
    assert resp.status == 403 and "CSRF" in await resp.text()
    client.session.cookie_jar.clear()  # no cookie at all
    resp = await client.post("/actions/retry", data={**form, "csrf": second}, allow_redirects=False)
    assert resp.status == 403
    assert (await queue.get(failed_task.id)).status == FAILED
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({BROWSER_COOKIE: cookie.value}, URL(str(client.make_url("/"))))
    resp = await client.post("/actions/retry", data={**form, "csrf": first}, allow_redirects=False)
    assert resp.status == 303
    assert (await queue.get(failed_task.id)).status == PENDING


async def test_allowed_host_names(make_client):
    client = await make_client(allowed_hosts=["dash.example", "[fd00::1]", "10.1.2.3"])
    for host in ("dash.example", "DASH.example:8377", "[fd00::1]:80", "10.1.2.3", "localhost"):
        assert (await client.get("/", headers={"Host": host})).status == 200, host
    for host in ("other.example", "sub.dash.example", "10.1.2.4", "[fd00::2]"):
        assert (await client.get("/", headers={"Host": host})).status == 421, host
    resp = await client.post("/actions/retry", data={}, headers={"Host": "dash.example", "Origin": "http://dash.example"})
    assert resp.status == 403 and "read-only" in await resp.text()  # past the Origin check (its port: 80 both)


def test_host_rule_of_each_bind():
    assert HostRule("127.0.0.1").names == {"127.0.0.1", "localhost", "::1"}
    assert HostRule("::1").names == {"127.0.0.1", "localhost", "::1"}
    named = HostRule("192.168.1.20", ["dash.lan"])
    assert named.accepts("192.168.1.20:8377") and named.accepts("dash.lan") and not named.accepts("localhost")
    assert not named.accepts("192.168.1.21")
    every = HostRule("0.0.0.0")  # any address of this machine; an IP literal cannot be rebound
    assert every.accepts("192.168.1.20:8377") and every.accepts("[2001:db8::5]") and every.accepts("localhost")
    assert not every.accepts("evil.example") and not every.accepts("192.168.1.20.nip.io")


# -- 5. open redirects: login's next=, the actions' back= ---------------------------------


HOSTILE = [
    "//evil.example", "/\\evil.example", "/%09/evil.example", "/\t/evil.example", "https://evil.example",
    "http:evil.example", "/%2F%2Fevil.example", "/%252F%252Fevil.example", "\t//x", "//\\evil.example",
    "/\\/evil.example", "/ /evil.example", "/\r\n/evil.example", "/%0d%0a/evil.example", "/%5C%5Cevil.example",
    "/..//evil.example", "/%2e%2e//evil.example", "/.//evil.example", "javascript:alert(1)", "evil.example",
    "///evil.example", " /x", "/\u3000/evil.example", "/%E3%80%80/evil.example", "/%00/evil.example",
    "/tasks\x7f", "%2F%2Fevil.example", "/%25252F%25252Fevil.example",
]


def assert_local(location: str, path: str = "/") -> None:
    parts = urlsplit(location)
    assert not parts.scheme and not parts.netloc and parts.path == path, location
    assert location.startswith(path) and not location.startswith("//") and "\\" not in location, location


@pytest.mark.parametrize("value", HOSTILE)
async def test_login_next_stays_on_this_server(make_client, value):
    client = await make_client(auth_token="s3cret")
    resp = await client.post("/login", data={"token": "s3cret", "next": value}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/", (value, resp.headers["Location"])
    html = await ok(await client.get("/login?next=" + quote(value, safe="")))
    assert 'name="next" value="/"' in html


@pytest.mark.parametrize("action", ["retry", "cancel"])
async def test_action_back_stays_on_this_server(client, action):
    csrf = csrf_of(await ok(await client.get("/tasks")))
    for value in HOSTILE:
        resp = await client.post(f"/actions/{action}", data={"csrf": csrf, "back": value}, allow_redirects=False)
        assert resp.status == 303, value
        assert_local(resp.headers["Location"])
    # a path of this server stays as it was, without an earlier message's parameters
    resp = await client.post(f"/actions/{action}", allow_redirects=False, data={
        "csrf": csrf, "back": "/tasks?status=failed&type=boom&msg=retried&msg_done=5&msg_skipped=2"})
    assert_local(resp.headers["Location"], "/tasks")
    assert urlsplit(resp.headers["Location"]).query == "status=failed&type=boom&msg=nothing-selected"


async def test_the_redirect_to_login_keeps_a_local_path_only(make_client):
    client = await make_client(auth_token="s3cret")
    resp = await client.get("/tasks?status=failed", headers={"Accept": "text/html"}, allow_redirects=False)
    location = URL(resp.headers["Location"])
    assert location.path == "/login" and location.query["next"] == "/tasks?status=failed"
    resp = await client.post("/login", data={"token": "s3cret", "next": location.query["next"]},
                             allow_redirects=False)
    assert resp.headers["Location"] == "/tasks?status=failed"


# -- 6. guessing the token --------------------------------------------------------------


async def test_wrong_tokens_are_slowed_down(make_client):
    """The audit sent 300 wrong tokens in 1.6 s, all answered 401. Now a few are, then 429,
    and then even the right token is refused until the wait is over."""
    client = await make_client(auth_token="s3cret")
    statuses = [(await client.post("/login", data={"token": f"guess-{i}"}, allow_redirects=False)).status
                for i in range(30)]
    # one try comes back every 10 s: a slow machine may see one or two more 401s, not 20
    assert statuses[:5] == [401] * 5 and statuses.count(429) >= 20 and set(statuses) == {401, 429}, statuses
    resp = await client.post("/login", data={"token": "s3cret"}, allow_redirects=False)
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1 and "Set-Cookie" not in resp.headers
    assert (await client.get("/", headers={"Authorization": "Bearer s3cret"})).status == 429


async def test_the_wait_follows_the_clock_and_a_success_refills_nothing(make_client):
    clock = FakeClock()
    client = await make_client(auth_token="s3cret", logins=LoginLimiter(burst=3, per=10.0, clock=clock))
    for _ in range(3):
        assert (await client.post("/login", data={"token": "wrong"}, allow_redirects=False)).status == 401
    resp = await client.post("/login", data={"token": "s3cret"}, allow_redirects=False)
    assert resp.status == 429 and resp.headers["Retry-After"] == "10"
    assert (await client.get("/", headers={"Authorization": "Bearer s3cret"})).status == 429
    clock.now += 9.5
    resp = await client.post("/login", data={"token": "s3cret"}, allow_redirects=False)
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    clock.now += 0.5  # one try back
    resp = await client.post("/login", data={"token": "s3cret"}, allow_redirects=False)
    assert resp.status == 303 and "qo_dashboard_auth" in resp.headers["Set-Cookie"]
    login = resp.cookies["qo_dashboard_auth"].value
    client.session.cookie_jar.clear()  # the header alone from here
    assert (await client.get("/", headers={"Authorization": "Bearer wrong"})).status == 401  # the try left
    assert (await client.get("/", headers={"Authorization": "Bearer wrong"})).status == 429  # none refilled
    client.session.cookie_jar.update_cookies({"qo_dashboard_auth": login}, URL(str(client.make_url("/"))))
    assert (await client.get("/")).status == 200  # the login cookie is not a guess: never limited


def test_the_limit_is_per_client_address():
    clock = FakeClock()
    limiter = LoginLimiter(burst=2, per=10.0, clock=clock, max_clients=10)
    for _ in range(2):
        limiter.failed("10.0.0.1")
        limiter.failed("2001:db8::1")
    assert limiter.wait("10.0.0.1") == 10.0 and limiter.wait("::ffff:10.0.0.1") == 10.0
    assert limiter.wait("10.0.0.2") == 0.0 and limiter.wait("127.0.0.1") == 0.0
    assert limiter.wait("2001:db8::2") == 10.0  # the same /64: one host's share
    assert limiter.wait("2001:db8:0:1::1") == 0.0
    clock.now += 5
    assert limiter.wait("10.0.0.1") == 5.0
    for i in range(50):
        limiter.failed(f"10.1.0.{i}")
    assert len(limiter._buckets) <= 10  # bounded, whatever the number of addresses


# -- 7. flash messages come from the server's table --------------------------------------


PHISH = "Your session expired: call +1 555 0100 and read them your token"
PAGES = ["/", "/tasks", "/dead-letters", "/schedules", "/limits", "/costs"]


@pytest.mark.parametrize("page", PAGES)
async def test_msg_text_in_the_url_is_never_shown(client, page):
    for query in (f"msg={quote(PHISH)}", f"msg=retried&msg_done={quote('3 tasks. ' + PHISH)}",
                  f"msg=paused&msg_schedule={quote(PHISH)}", f"msg=triggered&msg_schedule=s&msg_task={quote(PHISH)}",
                  "msg=retried&msg_done=-1", "msg=retried&msg_done=1e3", "msg=retried", "msg=__class__",
                  "msg=retried&msg=cancelled&msg_done=1", "msg=retried&msg_done=1&msg_done=2",
                  f"msg=retried-all&msg_n=2&msg_status={quote(PHISH)}", "msg_done=4"):
        html = await ok(await client.get(f"{page}?{query}"))
        assert flash_of(html) is None, (page, query)
        assert "555 0100" not in html and "555%200100" not in html, (page, query)


async def test_the_table_messages_show(client):
    html = await ok(await client.get("/tasks?msg=retried&msg_done=3&msg_skipped=1&msg_failed=2"))
    assert flash_of(html) == ("retried 3 tasks; 1 skipped (not in a state to be retried, or changed meanwhile); "
                              "2 failed (the dashboard&#39;s log says why)")
    assert flash_of(await ok(await client.get("/?msg=cancelled-all&msg_n=1&msg_status=pending"))) == \
        "cancelled 1 pending task"
    task_id = "0" * 24
    assert flash_of(await ok(await client.get(f"/schedules?msg=triggered&msg_schedule=nightly&msg_task={task_id}"))) \
        == f"triggered nightly: task {task_id}"
    assert flash_of(await ok(await client.get("/tasks?status=failed&msg=nothing-selected"))) == "nothing selected"


async def test_failures_are_counted_on_the_page_and_logged(client, failed_task, queue, caplog, monkeypatch):
    """An action's errors are free text: they go to the log, the page only counts them."""
    import qo

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise qo.StorageUnavailable("the store said no <b>here</b>")

    csrf = csrf_of(await ok(await client.get("/dead-letters")))
    monkeypatch.setattr(queue, "retry", broken)
    html = await ok(await client.post("/actions/retry", data={"csrf": csrf, "id": failed_task.id, "back": "/dead-letters"}))
    assert flash_of(html) == "retried 0 tasks; 1 failed (the dashboard&#39;s log says why)"
    assert f"retry of task {failed_task.id} failed: the store said no <b>here</b>" in caplog.text
    html = await ok(await client.post("/schedules/nosuch/pause", data={"csrf": csrf}))
    assert flash_of(html) == "no schedule named nosuch"
    monkeypatch.setattr(queue.schedules, "pause", broken)
    html = await ok(await client.post("/schedules/nightly/pause", data={"csrf": csrf}))
    assert flash_of(html) == "could not pause nightly (the dashboard&#39;s log says why)"
    assert "pause of schedule nightly failed: the store said no" in caplog.text
