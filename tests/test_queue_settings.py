"""Per-queue settings in the bucket (issue #9): every worker and producer agrees.

- set/unset merge by CAS: racing writers in several processes all land;
- bad input names the setting and writes nothing;
- a task's options not given take the queue's defaults (submit, submit_many,
  submit_graph, schedules, CLI); given ones win; producers re-read within the refresh;
- workers with different settings of their own all run with the queue's (processes),
  including aging switched on for workers whose own aging is off, and pick up a change
  while running.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

import pytest
from click.testing import CliRunner

import qo
import settings_procs
from qo import keys
from qo.aging import AgingSettings
from qo.cli import build_cli
from qo.clock import FakeClock
from qo.counting import CountingStorage
from qo.errors import InvalidInput, NotFound, StorageUnavailable
from qo.queue_settings import (
    REFRESH_SECONDS,
    SPECS,
    TASK_DEFAULTS,
    check_settings,
    overlay,
    parse_assignment,
    replaced,
    settings_key,
)
from qo.store import Backoff
from qo.worker import Worker, WorkerSettings

CTX = multiprocessing.get_context("spawn")


async def stored(q) -> dict | None:
    try:
        return json.loads((await q.storage.get(settings_key(q.name))).data)["settings"]
    except NotFound:
        return None


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- the object ---------------------------------------------------------------------


async def test_set_merges_unset_removes_and_every_reader_sees_the_same(storage_url):
    a = await qo.connect(storage_url, queue="s")
    b = await qo.connect(storage_url, queue="s")
    other = await qo.connect(storage_url, queue="other")
    assert await a.settings.get() == {}
    assert await a.settings.set(max_retries=5, priority="high") == {"max_retries": 5, "priority": 192}
    assert await a.settings.set({"poll_max": 2, "aging": "off"}) == {
        "max_retries": 5, "priority": 192, "poll_max": 2.0, "aging": False}
    assert await b.settings.get(refresh=True) == await a.settings.get()
    assert await other.settings.get() == {}  # per queue
    assert await b.settings.unset("priority", "aging") == {"max_retries": 5, "poll_max": 2.0}
    assert await stored(a) == {"max_retries": 5, "poll_max": 2.0}
    for q in (a, b, other):
        await q.close()


@pytest.mark.parametrize("values, field", [
    ({"bogus": 1}, "settings.bogus"),
    ({"max_retries": -1}, "settings.max_retries"),
    ({"max_retries": "many"}, "settings.max_retries"),
    ({"priority": 256}, "settings.priority"),
    ({"timeout_seconds": 0}, "settings.timeout_seconds"),
    ({"poll_max": float("inf")}, "settings.poll_max"),
    ({"aging": "maybe"}, "settings.aging"),
    ({"aging_cap": 300}, "settings.aging_cap"),
    ({"aging_step_levels": 0}, "settings.aging_step_levels"),
    ({"poll_min": 3, "poll_max": 1}, "settings.poll_max"),
])
async def test_a_bad_setting_names_the_field_and_writes_nothing(storage_url, values, field):
    q = await qo.connect(storage_url, queue="s")
    with pytest.raises(InvalidInput) as info:
        await q.settings.set(values)
    assert info.value.field == field
    assert await stored(q) is None
    await q.close()


async def test_a_value_crossing_a_stored_one_is_refused_before_writing(storage_url):
    q = await qo.connect(storage_url, queue="s")
    await q.settings.set(poll_max=1)
    with pytest.raises(InvalidInput) as info:
        await q.settings.set(poll_min=3)
    assert info.value.field == "settings.poll_max"
    assert await stored(q) == {"poll_max": 1.0}
    with pytest.raises(InvalidInput):
        await q.settings.unset("nope")
    with pytest.raises(InvalidInput):
        await q.settings.set()
    await q.close()


async def test_names_a_newer_release_wrote_are_kept_and_bad_stored_values_ignored(storage_url):
    q = await qo.connect(storage_url, queue="s")
    doc = {"schema": 1, "settings": {"future_knob": {"x": 1}, "max_retries": 7, "aging_cap": "lots"}}
    await q.storage.put(settings_key("s"), json.dumps(doc).encode())
    assert await q.settings.get() == {"max_retries": 7}  # the bad cap is skipped, with a warning
    await q.settings.unset("aging_cap")
    await q.settings.set(priority=9)
    assert await stored(q) == {"future_knob": {"x": 1}, "max_retries": 7, "priority": 9}
    await q.storage.put(settings_key("s"), b"not json")
    assert await q.settings.get(refresh=True) == {}
    assert await q.settings.set(max_retries=1) == {"max_retries": 1}  # an unreadable object is replaced
    await q.close()


def test_racing_writers_in_several_processes_all_land(storage_url):
    """Each process sets its own setting five times, all at once: the merge by CAS
    keeps every process's last value (no write is lost to another's)."""
    plan = {"max_retries": [1, 2, 3, 4, 5], "timeout_seconds": [10, 20, 30, 40, 50],
            "aging_cap": [10, 20, 30, 40, 50], "aging_interval": [1, 2, 3, 4, 5.5]}
    procs = [CTX.Process(target=settings_procs.set_settings_repeatedly, args=(storage_url, "race", name, values))
             for name, values in plan.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    async def check() -> None:
        q = await qo.connect(storage_url, queue="race")
        assert await q.settings.get() == {name: values[-1] for name, values in plan.items()}
        await q.close()

    asyncio.run(check())


# -- task defaults ------------------------------------------------------------------------


async def test_task_options_not_given_take_the_queues_defaults(storage_url):
    q = await qo.connect(storage_url, queue="s")
    plain = await q.submit("t")
    assert (plain.priority, plain.max_retries, plain.timeout_seconds) == (128, 3, 300.0)
    await q.settings.set(priority=200, max_retries=9, timeout_seconds=42)
    t = await q.submit("t")
    assert (t.priority, t.max_retries, t.timeout_seconds) == (200, 9, 42.0)
    given = await q.submit("t", priority=1, max_retries=0, timeout_seconds=5)
    assert (given.priority, given.max_retries, given.timeout_seconds) == (1, 0, 5.0)
    many = await q.submit_many([("t", None), ("t", None, {"priority": 7})])
    assert [(m.priority, m.max_retries) for m in many] == [(200, 9), (7, 9)]
    graph = await q.submit_graph({"a": {"task_type": "t"}, "b": {"task_type": "t", "depends_on": ["a"],
                                                                  "max_retries": 1}})
    assert (graph["a"].max_retries, graph["b"].max_retries, graph["b"].priority) == (9, 1, 200)
    assert (await q.get(t.id)).max_retries == 9  # stored, not only returned
    await q.close()


async def test_a_producer_reads_a_change_within_the_refresh(storage_url):
    clock = FakeClock()
    producer = await qo.connect(storage_url, queue="s", clock=clock)
    admin = await qo.connect(storage_url, queue="s")
    assert (await producer.submit("t")).max_retries == 3  # read once: nothing set
    await admin.settings.set(max_retries=6)
    assert (await producer.submit("t")).max_retries == 3  # its copy is fresh for a while
    clock.advance(REFRESH_SECONDS)
    assert (await producer.submit("t")).max_retries == 6
    await producer.close()
    await admin.close()


async def test_submits_read_the_settings_once_per_refresh(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="s", clock=clock, wrap_storage=CountingStorage)
    await q.submit_many([("t", None)] * 5)
    for _ in range(5):
        await q.submit("t")
    assert q.storage.counts()["GET"] == 1
    await q.close()


async def test_a_submit_does_not_fail_when_the_settings_cannot_be_read(storage_url):
    q = await qo.connect(storage_url, queue="s")
    await q.settings.set(max_retries=4)
    await q.settings.get(refresh=True)
    real_get = q.storage.get

    async def failing_get(key):
        if key == settings_key("s"):
            raise StorageUnavailable("injected", backend="test", key=key)
        return await real_get(key)

    q.storage.get = failing_get
    q.store.backoff = Backoff(attempts=1)
    q.settings._read_at = -1e18  # stale: the next submit reads again, and fails to
    task = await q.submit("t")
    assert task.max_retries == 4  # the last values read
    await q.close()


async def test_a_schedule_without_task_options_fires_with_the_queues_settings_of_that_time(storage_url):
    q = await qo.connect(storage_url, queue="s")
    await q.schedules.add("plain", cron="0 3 * * *", task_type="t")
    await q.schedules.add("fixed", cron="0 3 * * *", task_type="t", priority=5, max_retries=1)
    await q.settings.set(priority=220, max_retries=8)
    plain = await q.schedules.trigger("plain")
    fixed = await q.schedules.trigger("fixed")
    assert (plain.priority, plain.max_retries) == (220, 8)
    assert (fixed.priority, fixed.max_retries) == (5, 1)
    await q.close()


def test_the_cli_sets_shows_and_unsets_and_submit_uses_them(storage_url):
    runner = CliRunner()
    cli = build_cli()
    args = ["--url", storage_url, "--queue", "cli"]
    out = runner.invoke(cli, ["settings", "set", "max_retries=6", "aging=off", "poll_max=1.5", *args])
    assert out.exit_code == 0, out.output
    rows = {r["name"]: r for r in map(json.loads, runner.invoke(cli, ["settings", "show", "--json", *args])
                                      .output.splitlines())}
    assert set(rows) == set(SPECS)
    assert rows["max_retries"] == {**rows["max_retries"], "value": 6, "source": "queue"}
    assert rows["aging"]["value"] is False and rows["poll_max"]["value"] == 1.5
    assert rows["priority"]["source"] == "built-in" and rows["aging_cap"]["source"] == "each worker's own"
    task = json.loads(runner.invoke(cli, ["submit", "t", "--json", *args]).output)
    assert task["max_retries"] == 6
    task = json.loads(runner.invoke(cli, ["submit", "t", "--max-retries", "0", "--json", *args]).output)
    assert task["max_retries"] == 0
    out = runner.invoke(cli, ["settings", "unset", "max_retries", *args])
    assert out.exit_code == 0 and "max_retries          3" in out.output
    plain = runner.invoke(cli, ["settings", *args])  # no subcommand: show
    assert plain.exit_code == 0 and "aging                False" in plain.output


@pytest.mark.parametrize("argv, message, code", [
    (["settings", "set", "bogus=1"], "settings.bogus", 1),
    (["settings", "set", "max_retries"], "is not NAME=VALUE", 2),  # the shape: a usage error
    (["settings", "set", "poll_min=5", "poll_max=1"], "settings.poll_max", 1),
    (["settings", "set", "aging_cap=x"], "settings.aging_cap", 1),
    (["settings", "unset", "bogus"], "settings.bogus", 1),
])
def test_the_cli_rejects_bad_settings_before_creating_anything(tmp_path, argv, message, code):
    url = str(tmp_path / "fresh")
    out = CliRunner().invoke(build_cli(), [*argv, "--url", url])
    assert out.exit_code == code and message in out.output
    assert not (tmp_path / "fresh").exists()


# -- workers --------------------------------------------------------------------------


def test_the_queues_settings_go_over_a_workers_own():
    own = WorkerSettings(poll_min=0.5, poll_max=5.0, aging=AgingSettings(enabled=False, cap=100))
    assert overlay(own, {}) is own
    s = overlay(own, {"poll_max": 0.2, "aging": True, "aging_step_seconds": 7, "max_retries": 3})
    assert (s.poll_min, s.poll_max) == (0.2, 0.2)  # the own poll_min moved down to meet it
    assert s.aging == AgingSettings(enabled=True, cap=100, step_seconds=7.0)
    assert replaced(own, s) == ["poll_min 0.2 (own 0.5)", "poll_max 0.2 (own 5.0)", "aging True (own False)",
                                "aging_step_seconds 7 (own 60.0)"]
    s = overlay(own, {"poll_min": 9})
    assert (s.poll_min, s.poll_max) == (9, 9)
    assert parse_assignment("aging_interval=2.5") == ("aging_interval", 2.5)
    assert check_settings({"priority": "low"}) == {"priority": PRIORITY_LOW}


PRIORITY_LOW = qo.model.PRIORITY_LEVELS["low"]


async def test_a_running_worker_picks_up_a_change_at_its_refresh(storage_url, fast_settings):
    q = await qo.connect(storage_url, queue="live")
    admin = await qo.connect(storage_url, queue="live")
    await admin.settings.set(poll_max=0.3)
    w = Worker(q, settings=fast_settings, queue_settings_refresh=0.1)
    w.handler("noop")(lambda input, ctx: None)
    run = asyncio.create_task(w.run())

    async def poll_max_is(v):
        return w.settings.poll_max == v

    await wait_until(lambda: poll_max_is(0.3))
    assert w.own_settings.poll_max == fast_settings.poll_max
    await admin.settings.set(poll_max=0.4, aging=False)
    await wait_until(lambda: poll_max_is(0.4))
    assert not w.settings.aging.enabled
    await admin.settings.unset("poll_max")
    await wait_until(lambda: poll_max_is(fast_settings.poll_max))
    w.stop()
    await run
    await q.close()
    await admin.close()


async def test_workers_with_different_own_settings_all_run_with_the_queues(storage_url, tmp_path):
    """Three worker processes, each with its own poll_max and aging off, agree on the
    queue's settings: the queue's aging moves a waiting priority-0 marker to the top
    level (none of them would), and a change while they run reaches all three."""
    q = await qo.connect(storage_url, queue="agree")
    await q.settings.set(poll_max=0.2, aging=True, aging_step_seconds=0.05, aging_step_levels=255,
                         aging_interval=0.05)
    waiting = await q.submit("unhandled", priority=0)  # no worker runs it: it only waits
    stop = tmp_path / "stop"
    reports = [tmp_path / f"report-{i}.jsonl" for i in range(3)]
    procs = [CTX.Process(target=settings_procs.run_reporting_worker,
                         args=(storage_url, "agree", str(r), str(stop), own))
             for r, own in zip(reports, (1.0, 2.0, 3.0))]
    for p in procs:
        p.start()
    try:
        def last(report):
            lines = report.read_text().splitlines() if report.exists() else []
            return json.loads(lines[-1]) if lines else None

        async def all_report(expected):
            return all(last(r) == expected for r in reports)

        await wait_until(lambda: all_report({"poll_max": 0.2, "aging": True, "aging_step_seconds": 0.05}), 60)

        async def marker_at_top():
            entries = await q.storage.list(keys.ready_prefix("agree"))
            return [keys.parse_marker(e.key).priority for e in entries if waiting.id in e.key] == [255]

        await wait_until(marker_at_top)
        await q.settings.set(poll_max=0.4, aging=False)
        await wait_until(lambda: all_report({"poll_max": 0.4, "aging": False, "aging_step_seconds": 0.05}))
    finally:
        stop.write_text("")
        for p in procs:
            p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (await q.get(waiting.id)).priority == 0  # aging moves markers, never the task
    await q.close()


def test_qo_config_shows_the_queues_settings_over_the_local_ones(storage_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("QO_URL", "QO_QUEUE", "QO_POLL_MAX"):
        monkeypatch.delenv(var, raising=False)
    runner, cli = CliRunner(), build_cli()
    args = ["--url", storage_url, "--queue", "cfg"]
    assert runner.invoke(cli, ["settings", "set", "poll_max=0.5", "max_retries=7", *args]).exit_code == 0
    rows = {r["name"]: r for r in map(json.loads, runner.invoke(
        cli, ["config", "--json", "--queue-settings", *args], env={"QO_POLL_MAX": "9"}).output.splitlines())}
    assert rows["poll_max"]["value"] == 0.5
    assert rows["poll_max"]["source"] == "queue settings, cfg/settings.json; over 9.0 (env QO_POLL_MAX)"
    assert rows["max_retries"] == {"name": "max_retries", "value": 7, "source": "queue settings, cfg/settings.json"}
    plain = {r["name"]: r for r in map(json.loads, runner.invoke(
        cli, ["config", "--json", *args], env={"QO_POLL_MAX": "9"}).output.splitlines())}
    assert plain["poll_max"]["value"] == 9.0 and "max_retries" not in plain  # offline: local layers only


# -- a tampered object costs only a warning --------------------------------------------

HUGE_INT = "9" * 400  # a JSON integer no float holds: float() of it overflows
TAMPERED = {
    "strings, lists, null and objects for numbers": (
        b'{"settings": {"timeout_seconds": "abc", "poll_min": [1], "aging_cap": null, "aging": {"a": 1},'
        b' "max_retries": 7}}',
        {"max_retries": 7}, 4),
    "huge numbers": (
        b'{"settings": {"retention_completed": 1e308, "retention_failed": ' + HUGE_INT.encode() +
        b', "poll_max": ' + HUGE_INT.encode() + b', "timeout_seconds": "1e308", "aging_interval": 1e400,'
        b' "priority": ' + HUGE_INT.encode() + b', "max_retries": "' + b"9" * 5000 + b'", "poll_min": 0.5}}',
        {"poll_min": 0.5}, 7),
    "negative and NaN-like": (
        b'{"settings": {"max_retries": -3, "aging_step_seconds": "NaN", "poll_min": NaN, "poll_max": "-Infinity",'
        b' "retention_cancelled": -60, "aging_step_levels": -1, "priority": "high"}}',
        {"priority": qo.model.PRIORITY_LEVELS["high"]}, 6),
    "unknown keys only": (b'{"settings": {"from_the_future": 1e308, "": null}}', {}, 0),
    "settings not an object": (b'{"settings": [1, 2]}', {}, 1),
    "not an object": (b'[1]', {}, 1),
    "null": (b'null', {}, 1),
    "a number": (b'1e999', {}, 1),
    "nested past the parser's depth": (b'{"settings": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 1),
    "not text": (b"\xff\xfe\x00", {}, 1),
}


@pytest.mark.parametrize("data, good, warnings", TAMPERED.values(), ids=TAMPERED.keys())
async def test_a_tampered_settings_object_costs_only_a_warning_logged_once(storage_url, fast_settings, caplog,
                                                                           data, good, warnings):
    """Wrong types, huge numbers (an int past float's range once raised OverflowError out of
    every read), NaN, negatives, a non-object, JSON nested too deeply (RecursionError): each
    bad field is skipped with one warning, however often the object is re-read; the good
    ones and the built-in defaults apply, and a worker runs tasks under it."""
    q = await qo.connect(storage_url, queue="tamper")
    await q.storage.put(settings_key("tamper"), data)
    caplog.set_level("WARNING", logger="qo.queue_settings")
    for _ in range(3):
        assert await q.settings.get(refresh=True) == good
    defaults = await q.settings.task_defaults()
    assert defaults == {**TASK_DEFAULTS, **{k: v for k, v in good.items() if k in TASK_DEFAULTS}}
    task = await q.submit("echo", {"x": 1})
    w = Worker(q, settings=fast_settings, queue_settings_refresh=0.01)
    w.handler("echo")(lambda input, ctx: input)
    await asyncio.wait_for(w.run(until_idle=True), 60)
    assert (await q.get(task.id)).status == "completed"
    if "poll_min" in good:
        assert w.settings.poll_min == good["poll_min"]
    messages = [r.getMessage() for r in caplog.records if r.name == "qo.queue_settings"]
    assert len(messages) == warnings, messages
    assert len(set(messages)) == len(messages)  # each said once, not at every re-read
    await q.close()


async def test_a_bad_value_fixed_and_broken_again_is_warned_of_again(storage_url, caplog):
    q = await qo.connect(storage_url, queue="tamper")
    caplog.set_level("WARNING", logger="qo.queue_settings")
    for data in (b'{"settings": {"poll_min": "x"}}', b'{"settings": {"poll_min": "x"}}',
                 b'{"settings": {"poll_min": 1}}', b'{"settings": {"poll_min": "x"}}'):
        await q.storage.put(settings_key("tamper"), data)
        await q.settings.get(refresh=True)
    assert len([r for r in caplog.records if "poll_min" in r.getMessage()]) == 2
    await q.close()
