"""Issue #10: bad input, tried as a hostile user would, at every entry point.

Each bad value must give a ``qo.QoError`` (``InvalidInput`` naming the field,
``ConfigurationError``/``InvalidInput("url")`` for URLs) with a short readable message,
and nothing may be written: the whole storage root (and, for the local backend, the
directory holding it, which is also the working directory) is listed before and after.
Secrets (credentials in the environment, in URL userinfo or query) never appear in
errors, reprs, ``qo config``/``qo doctor`` output, stored objects or logs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from urllib.parse import urlsplit, urlunsplit

import pytest
from click.testing import CliRunner

import qo
import qo.handlers
from qo.backends import open_storage
from qo.cli import cli
from qo.errors import ConfigurationError, InvalidInput, QoError
from qo.model import MAX_INPUT_BYTES, MAX_PAYLOAD_BYTES
from qo.stored import MAX_VALUE_DEPTH

NAN, INF = float("nan"), float("inf")
LONG = "x" * 10240

#: strings no name, type, id or path segment may be
PATHISH = ["..", "../x", "/abs", "a/b", "a\\b", "a\x00b", "a\nb", "t\n", LONG, "a\ud800", "", 5, 1.5, b"ab", ["a"]]


class Custom:
    pass


def _deep(n: int) -> list:
    out = cur = []
    for _ in range(n):
        nxt: list = []
        cur.append(nxt)
        cur = nxt
    return out


_circular: list = []
_circular.append(_circular)

#: nested past the recursion limit, and just past MAX_VALUE_DEPTH (json encodes it; a
#: stored task holding it would be unreadable)
DEEP, TOO_DEEP = _deep(100_000), _deep(MAX_VALUE_DEPTH)
BAD_INPUTS = [{1, 2}, b"x", object(), Custom(), NAN, INF, -INF, {"a": [NAN]}, "x" * (MAX_PAYLOAD_BYTES + 1),
              "a\ud800", {"k\ud800": 1}, {(1, 2): 3}, DEEP, _circular, dt.datetime.now(dt.timezone.utc), TOO_DEEP,
              {"a": TOO_DEEP}]

MALFORMED_URLS = ["s3://", "s3:///x", "s3://bad_bucket!", "s3://UPPER/x", "s3://a..b/x", "file://host/x",
                  "http://x", "::", " ", "", "s3://[x", "s3//bucket", "s3:bucket", "a\x00b", 5, b"/tmp/x",
                  "s3://bucket/../x", "s3://bucket/a//b", "s3://bucket/x#frag", "s3://bucket/x?bogus=1"]


# -- snapshots: everything a call could have written -----------------------------------


class Env:
    def __init__(self, backend: str, storage_url: str, tmp_path, queue):
        self.backend, self.url, self.tmp_path, self.queue = backend, storage_url, tmp_path, queue
        self._bucket = None
        if backend in ("s3", "azure"):  # the whole bucket (container), not just our prefix
            p = urlsplit(storage_url)
            self._bucket = open_storage(urlunsplit((p.scheme, p.netloc, "", p.query, "")))

    async def snapshot(self) -> frozenset:
        if self._bucket is not None:
            return frozenset((e.key, e.etag) for e in await self._bucket.list("", limit=100_000))
        out = set()
        for folder, dirs, files in os.walk(self.tmp_path):  # the root's parent (and the cwd)
            rel = os.path.relpath(folder, self.tmp_path)
            rel = "" if rel == "." else rel
            out.update((os.path.join(rel, d) + "/", 0, 0) for d in dirs)
            for f in files:
                st = os.lstat(os.path.join(folder, f))
                out.add((os.path.join(rel, f), st.st_size, st.st_mtime_ns))
        return frozenset(out)

    async def close(self) -> None:
        if self._bucket is not None:
            await self._bucket.close()


@pytest.fixture
async def env(backend, storage_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path that slipped through would land here
    for var in ("QO_URL", "QO_QUEUE"):
        monkeypatch.delenv(var, raising=False)
    q = await qo.connect(storage_url, queue="q")
    e = Env(backend, storage_url, tmp_path, q)
    yield e
    await q.close()
    await e.close()


def _readable(exc: BaseException) -> str | None:
    msg = str(exc)
    if not msg or len(msg) > 1000:
        return f"unreadable message ({len(msg)} chars): {msg[:120]!r}..."
    return None


async def _expect_rejected(e: Env, label: str, call, field: str | None, errors=(InvalidInput,),
                           snapshot: bool = True) -> list[str]:
    """Run ``call``; the problems found (empty if it failed cleanly and wrote nothing).
    ``snapshot=False``: the caller compares the storage before and after a whole batch."""
    problems = []
    before = await e.snapshot() if snapshot else None
    try:
        result = call()
        if asyncio.iscoroutine(result):
            await result
    except QoError as exc:
        if not isinstance(exc, errors):
            problems.append(f"{label}: {type(exc).__name__} instead of {[t.__name__ for t in errors]}: {exc}")
        elif isinstance(exc, InvalidInput) and field is not None and not exc.field.startswith(field):
            problems.append(f"{label}: InvalidInput names {exc.field!r}, not {field!r}: {exc}")
        elif (bad := _readable(exc)) is not None:
            problems.append(f"{label}: {bad}")
    except BaseException as exc:  # noqa: BLE001 - exactly what this test hunts
        problems.append(f"{label}: raw {type(exc).__name__}: {str(exc)[:200]}")
    else:
        problems.append(f"{label}: accepted")
    after = await e.snapshot() if snapshot else None
    if after != before:
        problems.append(f"{label}: wrote {sorted(after - before)[:5]}, removed {sorted(before - after)[:5]}")
    return problems


def _label(name: str, value) -> str:
    try:
        r = repr(value)
    except RecursionError:
        r = f"<deep {type(value).__name__}>"
    return f"{name}({r if len(r) < 40 else r[:37] + '...'})"


# -- the Python API ---------------------------------------------------------------------

ID = "0" * 24
ID_LIKE = PATHISH + [None, "A" * 24, "0" * 23, "g" * 24, ID + "\n", ID + "/x", "../" + ID, DEEP]


def _worker(q, **kw):
    return qo.Worker(q, **kw)


def _handler(q, task_type):
    return qo.Worker(q).handler(task_type)(lambda input: None)


def _sched(q, name="s", **kw):
    args = dict(cron="*/5 * * * *", task_type="t")
    args.update(kw)
    return q.schedules.add(name, **args)


API_CASES = [
    # (id, call(queue, value), field named, values)
    ("submit.task_type", lambda q, v: q.submit(v, {}), "task_type", PATHISH + [None]),
    ("submit.input", lambda q, v: q.submit("t", v), "input", BAD_INPUTS),
    ("submit.priority", lambda q, v: q.submit("t", priority=v), "priority",
     [-1, 256, 1.5, True, False, "urgent", NAN, "", "300", 10**100, "-1", b"1", DEEP]),  # None: the default
    ("submit.timeout_seconds", lambda q, v: q.submit("t", timeout_seconds=v), "timeout_seconds",
     [-1, 0, -0.0, 1e12, NAN, INF, -INF, True, "10"]),
    ("submit.max_retries", lambda q, v: q.submit("t", max_retries=v), "max_retries",
     [-1, 1.5, True, 10**9, "3", NAN]),
    ("submit.schedule_at", lambda q, v: q.submit("t", schedule_at=v), "schedule_at",
     [dt.datetime(2030, 1, 1), dt.datetime.now(), "2030-01-01T00:00:00Z", 0, 1e10, dt.date(2030, 1, 1)]),
    ("submit.expires_at", lambda q, v: q.submit("t", expires_at=v), "expires_at",
     [dt.datetime(2030, 1, 1), dt.datetime.now(), "2030-01-01T00:00:00Z", 0, 1e10, dt.date(2030, 1, 1), NAN,
      dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc), dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)]),
    ("submit.expires_at_before_schedule_at",
     lambda q, v: q.submit("t", schedule_at=dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc), expires_at=v),
     "expires_at", [dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc)]),
    ("submit.idempotency_key", lambda q, v: q.submit("t", idempotency_key=v), "idempotency_key",
     ["", "a\x00b", "a\ud800", LONG, 5, b"k", 1.5, ["k"]]),
    ("submit.idempotency_scope", lambda q, v: q.submit("t", idempotency_key="k", idempotency_scope=v),
     "idempotency_scope", ["custom:../x", "custom:a/b", "custom:", "custom:a\x00", "custom:" + LONG,
                           "custom:\ud800", "custom:x\n", "bogus", "", None, "../x", "/abs", 5]),
    ("submit.idempotency_ttl_days", lambda q, v: q.submit("t", idempotency_key="k", idempotency_ttl_days=v),
     "idempotency_ttl_days", [-1, 0, NAN, INF, True, 1e9, "7", None]),
    ("submit.depends_on", lambda q, v: q.submit("t", depends_on=v), "depends_on",
     [ID, [".."], ["../x"], ["/abs"], ["a/b"], [None], [[1]], [{}], 5, b"x", ["A" * 24], [ID + "\x00"],
      [ID + "\n"], [LONG], [f"{i:024x}" for i in range(1001)], DEEP, [DEEP]]),  # 1001: over MAX_DEPENDENCIES
    ("submit.on_dependency_failure", lambda q, v: q.submit("t", on_dependency_failure=v),
     "on_dependency_failure", ["bogus", None, 5, "", "FAIL"]),
    ("submit.rate_limit_key", lambda q, v: q.submit("t", rate_limit_key=v), "rate_limit_key",
     ["", "a\x00b", "a\ud800", LONG, 5, b"k"]),
    ("submit_many.items", lambda q, v: q.submit_many(v), "items",
     [5, None, "abc", b"ab", {"t": {}}, [5], [None], [("t", {}, "opts")], [()], [("a", "b", {}, "d")]]),
    ("submit_many.task_type", lambda q, v: q.submit_many([("ok", {}), (v, {})]), "items[1].task_type",
     PATHISH + [None]),
    ("submit_many.input", lambda q, v: q.submit_many([("ok", {}), ("ok", v)]), "items[1].input",
     BAD_INPUTS[:6] + [DEEP, TOO_DEEP]),
    ("submit_many.options", lambda q, v: q.submit_many([("ok", {}), ("ok", {}, v)]), "items[1]",
     [{"bogus": 1}, {"priority": 256}, {"timeout_seconds": -1}, {"schedule_at": dt.datetime(2030, 1, 1)},
      {"expires_at": dt.datetime(2030, 1, 1)}, {"expires_at": "2030-01-01T00:00:00Z"},
      {"idempotency_key": "\ud800"}, {"rate_limit_key": "a\x00"}, {"depends_on": ["../x"]}]),
    ("submit_many.concurrency", lambda q, v: q.submit_many([("ok", {})], concurrency=v), "concurrency",
     [-1, 1.5, True, 10**9, "8"]),
    ("submit_graph.nodes", lambda q, v: q.submit_graph(v), "nodes",
     [{}, None, [], "abc", {"a": 5}, {"a": {}}, {"a": {"task_type": "t", "depends_on": "b"}},
      {"a": {"task_type": "t", "depends_on": [[1]]}}, {"a": {"task_type": "t", "depends_on": [None]}},
      {"a": {"task_type": "t", "bogus": 1}}, {"a": {"task_type": "t", "input": {1, 2}}},
      {"a": {"task_type": "t", "input": DEEP}}, {"a": {"task_type": "t", "input": TOO_DEEP}}, DEEP]),
    ("submit_graph.name", lambda q, v: q.submit_graph({v: {"task_type": "ok"}}), "nodes",
     [n for n in PATHISH if not isinstance(n, list)] + [None]),
    ("submit_graph.task_type",
     lambda q, v: q.submit_graph({"a": {"task_type": "ok"}, "b": {"task_type": v, "depends_on": ["a"]}}),
     "nodes[b].task_type", PATHISH + [None]),
    ("get", lambda q, v: q.get(v), "task_id", ID_LIKE),
    ("cancel", lambda q, v: q.cancel(v), "task_id", ID_LIKE),
    ("retry", lambda q, v: q.retry(v), "task_id", ID_LIKE),
    ("wait", lambda q, v: q.wait(v, timeout=0.01), "task_id", ID_LIKE),
    ("list.status", lambda q, v: q.list(status=v).__anext__(), "status", ["bogus", "", 5, "pending\n"]),
    ("list.task_type", lambda q, v: q.list(task_type=v).__anext__(), "task_type", PATHISH),
    ("list.limit", lambda q, v: q.list(limit=v).__anext__(), "limit", [-1, 1.5, "10", True, NAN]),
    ("retry_many.status", lambda q, v: q.retry_many(v), "status",
     ["pending", "completed", "bogus", "", None, 5, "failed\n", ["failed"]]),
    ("retry_many.task_type", lambda q, v: q.retry_many(task_type=v), "task_type", PATHISH),
    ("retry_many.since", lambda q, v: q.retry_many(since=v), "since",
     [dt.timedelta(hours=-1), "1h", NAN, INF, True, dt.datetime(2030, 1, 1)]),
    ("retry_many.progress", lambda q, v: q.retry_many(progress=v), "progress", [5, "print"]),
    ("cancel_many.status", lambda q, v: q.cancel_many(v), "status",
     ["cancelled", "completed", "bogus", "", None, 5, "pending\n"]),
    ("cancel_many.task_type", lambda q, v: q.cancel_many(task_type=v), "task_type", PATHISH),
    ("cancel_many.since", lambda q, v: q.cancel_many(since=v), "since", [dt.timedelta(hours=-1), "1h", NAN]),
    ("schedules.add.name", lambda q, v: _sched(q, v), "name", PATHISH + [None]),
    ("schedules.add.cron", lambda q, v: _sched(q, cron=v), "cron",
     [None, 5, "", "61 * * * *", "* * * * \x00", "*" * 10240, "\ud800 * * * *", "* * * * * * * *", "../x",
      "0" + ",0" * 200 + " * * * *", "0" + ",0" * 500_000 + " * * * *"]),  # valid, but over MAX_CRON_LENGTH
    ("schedules.add.timezone", lambda q, v: _sched(q, timezone=v), "timezone",
     ["../../etc/passwd", "/etc/localtime", "Europe/../UTC", "a\x00", "", LONG, "\ud800", None, 5,
      "Mars/Base", "Europe\\Berlin", "UTC\n", "../../../../../../usr/share/zoneinfo/UTC"]),
    ("schedules.add.catch_up", lambda q, v: _sched(q, catch_up=v), "catch_up", ["bogus", None, "", 5, ["all"]]),
    ("schedules.add.max_catch_up", lambda q, v: _sched(q, max_catch_up=v), "max_catch_up",
     [-1, 1.5, True, 10**9, NAN]),
    ("schedules.add.grace_seconds", lambda q, v: _sched(q, grace_seconds=v), "grace_seconds", [NAN, -1, INF, "1"]),
    ("schedules.add.enabled", lambda q, v: _sched(q, enabled=v), "enabled", ["yes", 1, None]),
    ("schedules.add.task_type", lambda q, v: _sched(q, task_type=v), "task_type", PATHISH + [None]),
    ("schedules.add.input", lambda q, v: _sched(q, input=v), "input", BAD_INPUTS[:8] + [DEEP, TOO_DEEP]),
    ("schedules.add.priority", lambda q, v: _sched(q, priority=v), "priority", [-1, 256, 1.5, True, "urgent"]),
    ("schedules.add.timeout_seconds", lambda q, v: _sched(q, timeout_seconds=v), "timeout_seconds",
     [-1, 0, NAN, INF, 1e12]),
    ("schedules.get", lambda q, v: q.schedules.get(v), "name", PATHISH + [None]),
    ("schedules.remove", lambda q, v: q.schedules.remove(v), "name", PATHISH + [None]),
    ("schedules.pause", lambda q, v: q.schedules.pause(v), "name", PATHISH + [None]),
    ("schedules.resume", lambda q, v: q.schedules.resume(v), "name", PATHISH + [None]),
    ("schedules.trigger", lambda q, v: q.schedules.trigger(v), "name", PATHISH + [None]),
    ("limits.set.scope", lambda q, v: q.limits.set(v, rate=1), "scope",
     ["task_type:../x", "task_type:", "task_type:a/b", "key:\ud800", "key:" + LONG, "key:", "key:a\x00",
      "global/../x", "../global", "/global", "", None, 5, "bogus", "global\n", "task_type:t\n"]),
    ("limits.set.rate", lambda q, v: q.limits.set("global", rate=v), "rate", [NAN, INF, -1, 0, True, "10"]),
    ("limits.set.per", lambda q, v: q.limits.set("global", rate=1, per=v), "per", [0, NAN, -1, INF, "1", None]),
    ("limits.set.burst", lambda q, v: q.limits.set("global", rate=1, burst=v), "burst", [0.5, NAN, INF, "2"]),
    ("limits.set.concurrency", lambda q, v: q.limits.set("global", concurrency=v), "concurrency",
     [0, 1.5, True, -1, 10**9, "2"]),
    ("limits.set.backpressure", lambda q, v: q.limits.set("global", rate=1, backpressure=v), "backpressure",
     ["bogus", None, ""]),
    ("limits.remove", lambda q, v: q.limits.remove(v), "scope",
     ["task_type:../x", "key:\ud800", "key:" + LONG, "../global", "", None, 5, "global\n"]),
    ("settings.set.name", lambda q, v: q.settings.set({v: 1}), "settings",
     [n for n in PATHISH if not isinstance(n, list)] + [None, 5, "aging.cap"]),
    ("settings.set.max_retries", lambda q, v: q.settings.set(max_retries=v), "settings.max_retries",
     [-1, 1.5, True, 10**9, "x", NAN, None, DEEP]),
    ("settings.set.poll_max", lambda q, v: q.settings.set(poll_max=v), "settings.poll_max",
     [NAN, INF, -1, 0, "nan", True, None, 1e9, DEEP]),
    ("settings.set.aging", lambda q, v: q.settings.set(aging=v), "settings.aging", ["maybe", 2, None, "", DEEP]),
    ("settings.set.aging_cap", lambda q, v: q.settings.set(aging_cap=v), "settings.aging_cap",
     [-1, 256, 1.5, "x", NAN, DEEP]),
    ("settings.set.values", lambda q, v: q.settings.set(v), "settings", ["x", 5, [("a", 1)], {}]),
    ("settings.unset", lambda q, v: q.settings.unset(v), "settings", PATHISH + [None, 5]),
    ("Worker.concurrency", lambda q, v: _worker(q, concurrency=v), "concurrency", [0, -1, 1.5, True, 10**6, "8", NAN]),
    ("Worker.lease_ttl", lambda q, v: _worker(q, lease_ttl=v), "lease_ttl", [NAN, INF, -1, 0, "30", True, None]),
    ("Worker.poll_max", lambda q, v: _worker(q, poll_max=v), "poll_max", [NAN, INF, -1, 0, "5", None]),
    ("Worker.shutdown_timeout", lambda q, v: _worker(q, shutdown_timeout=v), "shutdown_timeout", [NAN, INF, -1]),
    ("Worker.heartbeat_interval", lambda q, v: _worker(q, heartbeat_interval=v), "heartbeat_interval",
     [NAN, INF, -1, 0, "1"]),
    ("Worker.list_limit", lambda q, v: _worker(q, list_limit=v), "list_limit", [0, -1, 1.5, "10", NAN]),
    ("Worker.worker_id", lambda q, v: _worker(q, worker_id=v), "worker_id", PATHISH),
    ("Worker.unknown", lambda q, v: _worker(q, **{v: 1}), "bogus", ["bogus"]),
    ("Worker.settings", lambda q, v: qo.Worker(q, settings=v), "settings", ["x", {}, 5]),
    ("Worker.handler", lambda q, v: _handler(q, v), "task_type", [v for v in PATHISH if v != ""]),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
async def test_api_rejects_hostile_values(env, case):
    name, call, field, values = case
    problems = []
    before = await env.snapshot()  # one listing per case keeps the S3 run fast
    for value in values:
        problems += await _expect_rejected(env, _label(name, value), lambda: call(env.queue, value), field,
                                           snapshot=False)
    after = await env.snapshot()
    if after != before:
        problems.append(f"{name}: wrote {sorted(after - before)[:5]}, removed {sorted(before - after)[:5]}")
    assert not problems, "\n".join(problems)


async def test_json_at_the_depth_limit_round_trips(env, fast_settings):
    """MAX_VALUE_DEPTH levels are accepted and read back (the stored task stays within
    qo.stored's MAX_DEPTH); a handler's output one level deeper fails the task, saying
    why, instead of storing a task nobody could read."""
    q = env.queue
    at_limit = _deep(MAX_VALUE_DEPTH - 1)
    task = await q.submit("t", at_limit)
    assert (await q.get(task.id)).input == at_limit
    s = await _sched(q, "deep", input=at_limit)
    assert (await q.schedules.get(s.name)).input == at_limit
    await q.schedules.remove(s.name)
    await q.cancel(task.id)

    worker = qo.Worker(q, settings=fast_settings)
    worker.handler("deep_out")(lambda input: _deep(MAX_VALUE_DEPTH))
    deep_out = await q.submit("deep_out", None, max_retries=0)
    await worker.run(until_idle=True)
    done = await q.get(deep_out.id)
    assert done.status == "failed" and done.output is None
    assert f"nested more than {MAX_VALUE_DEPTH} levels deep" in str(done.last_error)


async def test_api_unknown_references(env):
    """Well-formed but unknown ids and names: a QoError naming them, nothing written."""
    q = env.queue
    problems = []
    for label, call, errors in [
        ("get", lambda: q.get(ID), (qo.TaskNotFound,)),
        ("cancel", lambda: q.cancel(ID), (qo.TaskNotFound,)),
        ("retry", lambda: q.retry(ID), (qo.TaskNotFound,)),
        ("depends_on", lambda: q.submit("t", depends_on=[ID]), (qo.DependencyError,)),
        ("graph dangling", lambda: q.submit_graph({"a": {"task_type": "t", "depends_on": ["b"]}}),
         (qo.DependencyError,)),
        ("graph cycle", lambda: q.submit_graph({"a": {"task_type": "t", "depends_on": ["b"]},
                                                "b": {"task_type": "t", "depends_on": ["a"]}}), (qo.DependencyError,)),
        ("schedule", lambda: q.schedules.get("nope"), (qo.ScheduleNotFound,)),
        ("schedule remove", lambda: q.schedules.remove("nope"), (qo.ScheduleNotFound,)),
        ("limit remove", lambda: q.limits.remove("global"), (InvalidInput,)),
    ]:
        problems += await _expect_rejected(env, label, call, None, errors)
    assert not problems, "\n".join(problems)


async def test_free_form_keys_stay_inside_the_queue(env):
    """Idempotency and rate-limit keys may be any string: they are hashed, never a path."""
    q = env.queue
    for i, key in enumerate(["..", "../x", "/abs", "a/b", "a\\b", "a\nb", "../../" * 40]):
        t = await q.submit("t", {"i": i}, idempotency_key=key, rate_limit_key=key)
        assert (await q.get(t.id)).rate_limit_key == key
        assert (await q.submit("t", {"i": i}, idempotency_key=key)).id == t.id
    await q.limits.set("key:../../x", rate=1)
    keys = {k for k, *_ in await env.snapshot()}
    if env.backend in ("s3", "azure"):
        root = urlsplit(env.url).path.strip("/")
        # the queue's keys, and the S3 backend's own note of the store's dialect (_qo/: the
        # store's, not any queue's; written by qo alone, never from a user's string)
        assert all(k.startswith(f"{root}/q/") or k == f"{root}/_qo/dialect.json" for k in keys), sorted(keys)
    else:
        assert all(k.startswith(("store/q/", "store/.qo-")) or k in ("store/", "store/q/") for k in keys), sorted(keys)


@pytest.mark.parametrize("url", MALFORMED_URLS, ids=[repr(u)[:20] for u in MALFORMED_URLS])
async def test_connect_rejects_malformed_urls(env, url):
    problems = await _expect_rejected(env, f"connect({url!r})", lambda: qo.connect(url, queue="q"), "url",
                                      (ConfigurationError, InvalidInput))
    assert not problems, "\n".join(problems)


async def test_connect_rejects_hostile_queue_names_and_options(env):
    problems = []
    for name in PATHISH + ["-q", ".q", "q" * 65]:
        problems += await _expect_rejected(env, _label("connect.queue", name),
                                           lambda: qo.connect(env.url, queue=name), "queue")
    for opts in [{"bogus": 1}, {"lock_stripes": "x"}, {"lock_stripes": 0}]:
        if env.backend != "local" and "lock_stripes" in opts:  # a local-only option
            continue
        problems += await _expect_rejected(env, _label("connect.options", opts),
                                           lambda: qo.connect(env.url, queue="q", options=opts), None)
    assert not problems, "\n".join(problems)


# -- the storage layer: no key reaches outside the root ---------------------------------

BAD_KEYS = ["..", "../x", "a/../../x", "a/..", "/etc/passwd", "//x", "a//b", "./a", "a/./b", "a/", "",
            "a\\..\\..\\b", "a\x00", "\ud800", "x" * 2000, None, 5, b"a"]


async def test_storage_keys_cannot_escape_the_root(env):
    storage = env.queue.storage
    problems = []
    for key in BAD_KEYS:
        for op, call in [("get", lambda: storage.get(key)), ("put", lambda: storage.put(key, b"x")),
                         ("create", lambda: storage.put(key, b"x", if_none_match=True)),
                         ("cas", lambda: storage.put(key, b"x", if_match='"x"')),
                         ("delete", lambda: storage.delete(key))]:
            problems += await _expect_rejected(env, _label(op, key), call, None, (InvalidInput,))
    for prefix in ["../", "..", "/", "/etc", "a/../", "a\x00", None]:
        problems += await _expect_rejected(env, _label("list", prefix), lambda: storage.list(prefix), None)
    if env.backend == "local":
        problems += await _expect_rejected(env, "reserved", lambda: storage.put(".qo-tmp/x", b"x"), "key")
    assert not problems, "\n".join(problems)
    # a file next to the root stays unreadable and undeletable through any key
    if env.backend == "local":
        secret = env.tmp_path / "outside.txt"
        secret.write_text("outside")
        for key in ["../outside.txt", "/" + str(secret).lstrip("/"), "q/../../outside.txt"]:
            with pytest.raises(InvalidInput):
                await storage.get(key)
            with pytest.raises(InvalidInput):
                await storage.delete(key)
        assert secret.read_text() == "outside"


# -- the command line -------------------------------------------------------------------


def _cli_cases(tmp_path) -> list[list[str]]:
    types = ["..", "../x", "/abs", "a/b", "a\\b", "a\nb", LONG, "a\ud800", "a\x00b", ""]
    ids = ["..", "../x", "/abs", "a/b", "0" * 23, LONG, "0" * 24 + "\n", "a\x00b"]
    names = ["..", "../x", "/abs", "a/b", "s\n", LONG, "a\x00b"]
    scopes = ["task_type:../x", "../global", "key:\ud800", "key:" + LONG, "global\n"]
    out: list[list[str]] = []
    out += [["submit", t] for t in types]
    out += [["submit", "t", "--input", v] for v in
            ["{bad", "NaN", '{"a": NaN}', "Infinity", "@/nonexistent/x", "@" + str(tmp_path), "@", "\ud800"]]
    out += [["submit", "t", "--priority", v] for v in ["urgent", "256", "-1", "1.5", "nan"]]
    out += [["submit", "t", opt, v] for opt, v in [
        ("--timeout", "-1"), ("--timeout", "nan"), ("--timeout", "0"), ("--timeout", "inf"),
        ("--max-retries", "-1"), ("--at", "2030-01-01T00:00:00"), ("--at", "garbage"), ("--delay", "-5s"),
        ("--expires-in", "-5m"), ("--expires-in", "garbage"), ("--expires-in", "0"), ("--expires-in", "1e400"),
        ("--expires-at", "2000-01-01T00:00:00Z"), ("--expires-at", "2030-01-01T00:00:00"), ("--expires-at", "x"),
        ("--delay", "1e400"), ("--delay", "99999999999999999d"), ("--idempotency-key", ""),
        ("--idempotency-scope", "custom:../x"), ("--idempotency-ttl-days", "nan"), ("--rate-limit-key", "a\x00"),
        ("--depends-on", "../x"), ("--depends-on", "0" * 24), ("--on-dependency-failure", "bogus"),
        ("--queue", "a/b"), ("--queue", ".."), ("--queue", ""), ("--queue", "q\n")]]
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    with open(tmp_path / "huge.json", "wb") as f:  # 1 GB, sparse: read at most MAX_INPUT_BYTES + 1 of it
        f.truncate(10**9)
    out += [["submit", "t", "--input", v] for v in [deep, "[" * 101 + "]" * 101, "@" + str(tmp_path / "deep.json"),
                                                     "@" + str(tmp_path / "huge.json"), "@/dev/zero"]]
    out += [["schedule", "add", "s", "--cron", "* * * * *", "--type", "t", "--input", v]
            for v in [deep, "@" + str(tmp_path / "huge.json")]]
    out += [["submit", "t", "--delay", "1h", "--expires-in", "1m"],
            ["submit", "t", "--expires-in", "1m", "--expires-at", "2030-01-01T00:00:00Z"],
            ["submit-graph", '{"a": {"task_type": "t", "expires_at": "2030-01-01T00:00:00"}}'],
            ["submit-graph", '{"a": {"task_type": "t", "expires_at": 5}}']]
    out += [["submit-graph", deep], ["submit-graph", '{"a": {"task_type": "t", "input": ' + deep + "}}"],
            ["settings", "set", "max_retries=" + deep]]
    fresh = str(tmp_path / "fresh")  # a store that does not exist yet must not be created
    out += [["submit", "../x", "--url", fresh], ["status", "../x", "--url", fresh], ["cancel", "..", "--url", fresh],
            ["retry", "/abs", "--url", fresh], ["schedule", "add", "../s", "--cron", "* * * * *", "--type", "t",
                                                "--url", fresh], ["schedule", "remove", "../s", "--url", fresh],
            ["limit", "set", "../global", "--rate", "1", "--url", fresh], ["limit", "remove", "..", "--url", fresh],
            ["submit", "t", "--url", str(tmp_path / "fresh\ud800")]]
    out += [["submit", "t", "--url", u] for u in ["s3://", "s3:///x", "s3://bad_bucket!", "file://host/x",
                                                  "http://x", "::", " "]]
    out += [[cmd, i] for cmd in ("status", "cancel", "retry") for i in ids]
    out += [["list", "--type", "../x"], ["list", "--status", "bogus"], ["list", "--limit", "-1"]]
    out += [["retry", "--all-failed", "--type", t] for t in ("../x", "a/b", "a\x00b", "")]
    out += [["cancel", "--status", "pending", "--type", t] for t in ("../x", "a/b", "a\x00b", "")]
    out += [["retry", "--all-failed", "--since", "soon"], ["cancel", "--status", "blocked", "--yes", "--since", "-1h"],
            ["retry", "--all-failed", "--type", "../x", "--url", fresh],
            ["cancel", "--status", "pending", "--type", "../x", "--url", fresh],
            ["cancel", "--status", "pending"], ["cancel", "--status", "completed", "--yes"], ["retry"],
            ["retry", "0" * 24, "--all-failed"]]
    out += [["schedule", "add", n, "--cron", "* * * * *", "--type", "t"] for n in names]
    out += [["schedule", "add", "s", "--cron", c, "--type", t, *extra] for c, t, extra in [
        ("61 * * * *", "t", []), ("0" + ",0" * 200 + " * * * *", "t", []), ("* * * * *", "../x", []),
        ("* * * * *", "t", ["--timezone", "../../etc/passwd"]),
        ("* * * * *", "t", ["--timezone", "/etc/localtime"]), ("* * * * *", "t", ["--catch-up", "bogus"]),
        ("* * * * *", "t", ["--priority", "256"]), ("* * * * *", "t", ["--timeout", "-1"]),
        ("* * * * *", "t", ["--input", "NaN"])]]
    out += [["schedule", cmd, n] for cmd in ("show", "pause", "resume", "trigger", "remove") for n in names[:4]]
    out += [["limit", "set", s, "--rate", "1"] for s in scopes]
    out += [["limit", "set", "global", "--rate", r] for r in ["nan/s", "10/x", "-1", "inf", "1e400/s", ""]]
    out += [["settings", "set", a] for a in ["bogus=1", "max_retries", "=1", "max_retries=-1", "poll_max=nan",
                                            "aging=maybe", "aging_cap=256", "a\x00b=1", "max_retries=\ud800"]]
    out += [["settings", "set", "poll_min=5", "poll_max=1"], ["settings", "unset", "../x"],
            ["settings", "unset", "a\nb"], ["settings", "set", "bogus=1", "--url", fresh],
            ["settings", "unset", "..", "--url", fresh]]
    out += [["limit", "set", "global", "--concurrency", "0"], ["limit", "remove", "../global"],
            ["limit", "remove", "key:\ud800"]]
    out += [["worker", m, "--until-idle"] for m in ["../nonexistent.py", "/abs/x.py", "a\x00b", "..", ".x", "a..b"]]
    out += [["worker", "handlers.py", "--until-idle", *extra] for extra in
            (["--concurrency", "0"], ["--lease-ttl", "nan"], ["--poll-max", "-1"], ["--lease-ttl", "inf"],
             ["--queue", "a/b"])]
    return out


def test_cli_rejects_hostile_arguments(backend, storage_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "handlers.py").write_text("import qo\n\n@qo.handler('hostile_t')\ndef h(input):\n    return 1\n")
    for var in ("QO_URL", "QO_QUEUE"):
        monkeypatch.delenv(var, raising=False)

    async def prepare():
        q = await qo.connect(storage_url, queue="q")
        e = Env(backend, storage_url, tmp_path, q)
        return q, e

    q, e = asyncio.run(prepare())
    runner = CliRunner()
    problems = []
    cases = _cli_cases(tmp_path)
    start = asyncio.run(e.snapshot())
    try:
        for args in cases:
            full = args + (["--url", storage_url] if "--url" not in args else []) + \
                (["--queue", "q"] if "--queue" not in args else [])
            # per command on the local backend; S3 and Azure compare the whole run (a
            # listing per command would open a new HTTP session each time)
            before = asyncio.run(e.snapshot()) if backend == "local" else start
            result = runner.invoke(cli, full)
            after = asyncio.run(e.snapshot()) if backend == "local" else start
            label = " ".join(repr(a)[:30] for a in args)
            out = result.output + (getattr(result, "stderr", "") or "")
            if result.exit_code not in (1, 2):
                problems.append(f"{label}: exit {result.exit_code}: {out[:200]!r}")
            elif not isinstance(result.exception, SystemExit):
                problems.append(f"{label}: raw {type(result.exception).__name__}: {result.exception}")
            elif "rror" not in out or "Traceback" in out or len(out) > 2500:
                problems.append(f"{label}: unreadable output {out[:200]!r}")
            if after != before:
                problems.append(f"{label}: wrote {sorted(after - before)[:5]}")
        end = asyncio.run(e.snapshot())
        if end != start:
            problems.append(f"wrote {sorted(end - start)[:5]}")
    finally:
        asyncio.run(e.close())
        qo.handlers.default_registry.handlers.pop("hostile_t", None)
    assert not problems, "\n".join(problems)


# -- secrets ----------------------------------------------------------------------------

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "AwsSecretZq7Fake0000000000000000000000000",
    "QO_S3_SECRET_ACCESS_KEY": "QoS3SecretXk2Fake000000000000000000000000",
    "QO_S3_SESSION_TOKEN": "QoS3SessionTokenFake9911",
}
USERINFO_SECRET = "UserinfoPwFake5521"
QUERY_SECRET = "QuerySecretFake7734"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leaks(text: str) -> list[str]:
    secrets = [*SECRETS.values(), USERINFO_SECRET, QUERY_SECRET]
    return [s for s in secrets if s in text]


@pytest.fixture
def fake_credentials(monkeypatch):
    for var, value in SECRETS.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("QO_S3_ACCESS_KEY_ID", "AKIAQOFAKEKEYID00001")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAAWSFAKEKEYID0001")
    for var in ("QO_URL", "QO_QUEUE"):
        monkeypatch.delenv(var, raising=False)


async def test_secrets_never_in_errors_or_reprs(fake_credentials, moto_server, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    port = _closed_port()
    seen: list[str] = []
    u = "AKIAUSERINFO"
    failing = [
        f"s3://{u}:{USERINFO_SECRET}@bucket/x",
        f"s3://bad_bucket!/x?region={QUERY_SECRET}",
        f"s3://bucket/x?endpoint_url=http://u:{USERINFO_SECRET}@127.0.0.1:{port}",
        f"s3://bucket/x?bogus={QUERY_SECRET}",
        f"s3://bucket/x?{QUERY_SECRET}",
        f"file://u:{USERINFO_SECRET}@host/x",
        f"s3://[{USERINFO_SECRET}",
    ]
    for url in failing:
        with pytest.raises(QoError) as info:
            await qo.connect(url, queue="q")
        seen.append(f"{info.value!r} {info.value}")
    # reachable URL shapes whose requests fail: connection refused, NoSuchBucket
    for url in [f"s3://bucket/x?endpoint_url=http://127.0.0.1:{port}",
                moto_server.url("x", bucket="qo-no-such-bucket-hostile")]:
        storage = open_storage(url)
        seen.append(repr(storage))
        for op in (lambda: storage.get("q/k"), lambda: storage.put("q/k", b"x", if_none_match=True),
                   lambda: storage.list("q/")):
            with pytest.raises(qo.StorageError) as info:
                await op()
            seen.append(f"{info.value!r} {info.value} {info.value.__cause__!r}")
        await storage.close()
    q = await qo.connect(moto_server.new_bucket("p"), queue="q")
    seen.append(repr(q) + repr(q.storage))
    await q.close()
    text = "\n".join(seen) + "\n".join(r.getMessage() for r in caplog.records)
    assert "does not exist" in text and "cannot reach" in text
    assert not _leaks(text), _leaks(text)


async def test_secrets_never_stored_or_logged_by_a_worker(fake_credentials, moto_server, caplog):
    caplog.set_level(logging.DEBUG)
    q = await qo.connect(moto_server.new_bucket("p"), queue="q")
    w = qo.Worker(q, poll_min=0.01, poll_max=0.05, shutdown_timeout=5.0)

    @w.handler("echo")
    def echo(input):
        return {"env": sorted(k for k in os.environ if k.startswith("QO_"))}

    @w.handler("boom")
    def boom(input):
        raise qo.Fail("no")

    a = await q.submit("echo", {"x": 1}, idempotency_key="k1", rate_limit_key="r")
    b = await q.submit("boom", {}, max_retries=0)
    await q.limits.set("global", rate=100)
    await q.schedules.add("s", cron="* * * * *", task_type="echo")
    await w.run(until_idle=True)
    assert (await q.get(a.id)).status == "completed" and (await q.get(b.id)).status == "failed"
    stored = []
    for entry in await q.storage.list("", limit=10_000):
        stored.append(entry.key + (await q.storage.get(entry.key)).data.decode())
    await q.close()
    text = "\n".join(stored) + "\n".join(r.getMessage() for r in caplog.records)
    text += "\n".join(str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert not _leaks(text), _leaks(text)


def test_secrets_never_in_qo_config_or_doctor(fake_credentials, moto_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    url = f"s3://AKIAUSERINFO:{USERINFO_SECRET}@bucket/x?region={QUERY_SECRET}&{QUERY_SECRET}"
    monkeypatch.setenv("QO_URL", url)
    for args in (["config"], ["config", "--json"], ["config", "--url", url]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert "QO_URL" in result.output or "--url" in result.output
        assert not _leaks(result.output), (args, result.output)
    monkeypatch.delenv("QO_URL")
    good = moto_server.new_bucket("doc")
    port = _closed_port()
    for args, code in [(["doctor", "--url", good], 0), (["doctor", "--url", good, "--json"], 0),
                       (["doctor", "--url", f"s3://bucket/x?endpoint_url=http://127.0.0.1:{port}"], 1),
                       (["doctor", "--url", url], 1), (["submit", "t", "--url", url], 1),
                       (["status", ID, "--url", good], 1)]:
        result = runner.invoke(cli, args)
        assert result.exit_code == code, (args, result.output)
        assert not _leaks(result.output), (args, result.output)
