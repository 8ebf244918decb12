"""qo-fairshare changes which task waits: with QO_FAIRSHARE=on a favoured type's
waiting markers are moved up by an aging pass sooner than the default policy moves them;
off, or blocked by QO_DISABLE_PLUGINS, the default behaviour holds.

Self-contained (no qo tests/conftest.py); the plugin is found through its entry point.
"""

from __future__ import annotations

import types

import pytest

import qo
from qo import keys
from qo.aging import AgingSettings, age_ready
from qo.plugins import Plugins, disabled_from_env
from qo.testing import FakeClock
from qo_fairshare import FairShareSettings, fair_priority, qo_effective_priority

ENV = ("QO_FAIRSHARE", "QO_FAIRSHARE_TYPES", "QO_FAIRSHARE_BOOST", "QO_DISABLE_PLUGINS",
       "QO_AGING", "QO_AGING_STEP_SECONDS", "QO_AGING_STEP_LEVELS", "QO_AGING_CAP")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fair_on(monkeypatch):
    monkeypatch.setenv("QO_FAIRSHARE", "on")
    monkeypatch.setenv("QO_FAIRSHARE_TYPES", "report, invoice")


def fresh_plugins() -> Plugins:
    """The installed plugins as a new process would load them (QO_DISABLE_PLUGINS read now)."""
    plugins = Plugins(disabled=disabled_from_env())
    plugins.load_entry_points()
    return plugins


async def levels_after(tmp_path, waited: float) -> dict[str, int]:
    """Submit a priority-0 ``report`` and ``bulk`` task, wait ``waited`` s on a fake clock,
    run one aging pass: the level each type's ready marker is at afterwards."""
    plugins = fresh_plugins()
    clock = FakeClock(1_800_000_000.0)
    q = await qo.connect(str(tmp_path / "store"), queue="fair", plugins=plugins, clock=clock)
    try:
        await q.submit("report", None, priority=0)
        await q.submit("bulk", None, priority=0)
        clock.advance(waited)
        await age_ready(q.store, plugins, AgingSettings(), clock.now())
        out = {}
        for entry in await q.storage.list(keys.ready_prefix(q.name)):
            marker = keys.parse_marker(entry.key)
            out[marker.task_type] = marker.priority
        return out
    finally:
        await q.close()


def test_the_plugin_is_installed_and_loaded_from_its_entry_point():
    plugins = fresh_plugins()
    info = plugins.info["fairshare"]
    assert (info.status, info.distribution) == ("loaded", "qo-fairshare")
    assert info.hooks == ["qo_effective_priority", "qo_worker_started"]


# qo's aging moves a marker only in jumps (to at least 128 levels higher, or the cap):
# the policy's answer matters once it reaches a jump


async def test_on_a_favoured_type_is_moved_up_sooner_than_the_default_would(tmp_path, fair_on):
    # 65 s: 4x faster, report has had 4 15-s steps (128: a jump); bulk 1 step (32: none)
    assert await levels_after(tmp_path, 65) == {"report": 128, "bulk": 0}


async def test_on_a_favoured_type_keeps_its_lead_as_both_age(tmp_path, fair_on):
    # 250 s: the default raises bulk 4 steps (128); report reached the cap long ago
    assert await levels_after(tmp_path, 250) == {"report": 255, "bulk": 128}


async def test_off_the_default_policy_holds(tmp_path):
    assert await levels_after(tmp_path, 65) == {"report": 0, "bulk": 0}
    assert await levels_after(tmp_path, 250) == {"report": 128, "bulk": 128}


async def test_switched_on_but_blocked_by_name_the_default_policy_holds(tmp_path, fair_on, monkeypatch):
    monkeypatch.setenv("QO_DISABLE_PLUGINS", "fairshare")
    assert fresh_plugins().info["fairshare"].status == "blocked"
    assert await levels_after(tmp_path, 20) == {"report": 0, "bulk": 0}


def entry(task_type: str, priority: int, aging: AgingSettings | None = None):
    return types.SimpleNamespace(priority=priority, due=0.0, task_id="t" * 24, task_type=task_type,
                                 aging=aging or AgingSettings())


def test_the_hook_has_no_opinion_when_off_or_for_other_types(fair_on, monkeypatch):
    assert qo_effective_priority(entry("bulk", 0), 1000) is None  # not favoured: default decides
    assert qo_effective_priority(entry("report", 0), 1000) == 255
    monkeypatch.setenv("QO_FAIRSHARE", "off")
    assert qo_effective_priority(entry("report", 0), 1000) is None


def test_the_hook_follows_the_workers_aging_settings(fair_on, monkeypatch):
    monkeypatch.setenv("QO_FAIRSHARE_BOOST", "2")
    aging = AgingSettings(step_seconds=10, step_levels=50, cap=200)
    assert qo_effective_priority(entry("invoice", 0, aging), 5) == 50
    assert qo_effective_priority(entry("invoice", 0, aging), 1000) == 200  # the cap
    assert qo_effective_priority(entry("invoice", 220, aging), 1000) == 220  # never lowers


def test_the_rule_is_monotone_and_the_same_from_a_raised_level():
    """What qo.aging requires of a policy: f(f(p, w1), w2) == f(p, w2) for w1 <= w2."""
    for p in (0, 7, 100, 255):
        for w1 in range(0, 400, 7):
            for w2 in range(w1, 400, 13):
                once = fair_priority(p, w2, 4, 60, 32, 255)
                assert fair_priority(fair_priority(p, w1, 4, 60, 32, 255), w2, 4, 60, 32, 255) == once
                assert fair_priority(p, w1, 4, 60, 32, 255) <= once


@pytest.mark.parametrize("name, value", [("QO_FAIRSHARE", "maybe"), ("QO_FAIRSHARE_BOOST", "x"),
                                         ("QO_FAIRSHARE_BOOST", "0.5")])
def test_bad_settings_are_named(name, value):
    with pytest.raises(qo.InvalidInput, match=name):
        FairShareSettings.from_env({"QO_FAIRSHARE": "on", name: value})


async def test_an_invalid_setting_stops_the_worker_at_start_up_and_is_said_once(tmp_path, fair_on, monkeypatch,
                                                                               caplog):
    monkeypatch.setenv("QO_FAIRSHARE_BOOST", "0.5")
    q = await qo.connect(str(tmp_path / "store"), queue="fair", plugins=fresh_plugins())
    try:
        task = await q.submit("report")
        w = qo.Worker(q, poll_max=0.05)
        w.handler("report")(lambda input: None)
        with pytest.raises(qo.InvalidInput) as e:
            await w.run(until_idle=True)
        assert e.value.field == "QO_FAIRSHARE_BOOST"
        assert (await q.get(task.id)).status == "pending"  # nothing was claimed
        assert [e.key async for e in _records(q)] == []  # and no worker record was left
        entry = types.SimpleNamespace(task_type="report", priority=0, aging=None)
        for _ in range(3):  # asked outside a worker (qo status): no opinion, said once
            assert qo_effective_priority(entry, 600.0) is None
        assert sum("qo-fairshare is off" in r.getMessage() for r in caplog.records) == 1
    finally:
        await q.close()


async def _records(q):
    for e in await q.storage.list(keys.workers_prefix(q.name)):
        yield e
