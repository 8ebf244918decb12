"""Chaos: 2 producers, 4 workers and 2 schedulers (processes) on one bucket, storage
faults injected in every process, workers and schedulers SIGKILLed at random and
restarted, poison objects planted under tasks/, workers/, schedules/ and limits/; then a
clean drain and the invariants (tests/chaos_procs.py). A larger run: benchmarks/chaos.py.

The checks themselves are tested first, fast: each must be able to fail."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time

import pytest

import chaos_procs

# seconds of chaos per backend: moto serialises writes and Azurite is one node process
# next to the eight under test, so the emulated clouds get shorter runs
SECONDS = {"local": 15.0, "s3": 11.0, "azure": 10.0, "sqlite": 8.0}
#: the queue's key layout per backend: S3's, where spreading matters, is spread over 4 shards
SHARDS = {"local": 1, "s3": 4, "azure": 1, "sqlite": 1}
#: what the chaos must have done before it stops (it goes on past SECONDS, up to 3x, until
#: then): a loaded machine submits less per second, and 0 faults of a kind prove nothing
AT_LEAST = {"submitted": 30, "error": 1, "lost_response": 1, "landed_error": 1, "kills_worker": 3,
            "kills_scheduler": 1}


@pytest.mark.timeout(170)
def test_chaos_producers_killed_workers_and_schedulers_poison_and_storage_faults(storage_url, backend, tmp_path):
    report = chaos_procs.run_chaos(storage_url, str(tmp_path / "chaos"), seconds=SECONDS[backend],
                                   producers=2, workers=4, schedulers=2, kill_every=(0.5, 2.0), seed=7,
                                   shards=SHARDS[backend], at_least=AT_LEAST)
    print(json.dumps(report, indent=1, sort_keys=True))
    assert report["problems"] == [], "\n".join(report["problems"][:30])
    s = report["summary"]
    assert s["kills_workers"] >= 3 and s["kills_schedulers"] >= 1
    assert s["tasks"] >= 30 and s["every_good_task_completed"]  # tasks: submitted and fired
    assert s["lost"] == s["left_running_without_live_lease"] == s["completed_twice_without_kill"] == 0
    assert s["double_schedule_fires"] == 0 and s["ticks_fired"] > 0
    assert s["poison_planted"] >= 5 and s["poison_must_missed"] == 0
    assert report["injected"]["error"] > 0 and report["injected"]["lost_response"] > 0
    assert report["injected"]["landed_error"] > 0


# -- the checks can fail --------------------------------------------------------------------


def test_every_poison_kind_is_unreadable_as_what_its_prefix_holds():
    from qo.errors import CorruptObject
    from qo.model import Task

    rng = random.Random(1)
    for n, kind in enumerate(chaos_procs.POISON_KINDS):
        objects = chaos_procs.plant(kind, n, rng, limited=True)
        assert objects and all(k.startswith(chaos_procs.QUEUE + "/") for k, _, _ in objects)
        if kind.startswith("task-"):
            key, data, _ = objects[0]
            with pytest.raises(CorruptObject):
                Task.from_json(data, key)
    assert chaos_procs.poison_kinds("task,worker-array") == chaos_procs.TASK_POISON + ("worker-array",)
    with pytest.raises(ValueError):
        chaos_procs.poison_kinds("tasks")


def test_a_rerun_needs_a_kill_between_the_runs_a_first_flaky_attempt_or_a_lost_lease():
    runs = {
        "a" * 24: [(1.0, 1, "100"), (5.0, 1, "200")],  # 100 killed at 2: explained
        "b" * 24: [(1.0, 1, "300"), (5.0, 2, "200")],  # 300 killed before it ran: not
        "c" * 24: [(1.0, 1, "200"), (5.0, 2, "200")],  # flaky first attempt
        "d" * 24: [(1.0, 1, "200"), (2.0, 1, "clean-9")],  # twice, nobody killed: not
        "e" * 24: [(1.0, 1, "400"), (3.0, 2, "200")],  # 400 said it lost the lease
        "f" * 24: [(1.0, 1, "100"), (1.5, 2, "200"), (9.0, 3, "200")],  # the second is unexplained
        "g" * 24: [(1.0, 1, "500"), (5.0, 2, "200")],  # recovered from 500 at 4.5, 500 killed at 6
        "h" * 24: [(1.0, 1, "600"), (5.0, 2, "200")],  # recovered from 600 at 4.5, never killed
        "i" * 24: [(1.0, 1, "700"), (5.0, 2, "200")],  # a recovery from another worker: no excuse
    }
    types = {"c" * 24: "flaky"}
    recoveries = {"g" * 24: [(4.5, "500")], "h" * 24: [(4.5, "600")], "i" * 24: [(4.5, "800")]}
    counts, bad = chaos_procs.explain_reruns(runs, types, {"100": 2.0, "300": 0.5, "500": 6.0},
                                             {("400", "e" * 24)}, recoveries)
    assert sorted(bad) == ["b" * 24, "d" * 24, "f" * 24, "i" * 24]
    assert counts == collections.Counter(after_kill=2, flaky_first_attempt=1, after_lease_lost=1, unexplained=4,
                                         lease_expired_then_killed=1, lease_expired=1)
    assert chaos_procs.RECOVERED_BY.search("worker vm-12-7-abc123 stopped renewing its lease").group(1) == "7"


def test_a_running_task_without_a_live_lease_is_found(tmp_path):
    import qo
    from qo import keys
    from qo.model import Task

    async def main() -> dict[str, str | None]:
        q = await qo.connect(str(tmp_path), queue=chaos_procs.QUEUE)
        now = time.time()
        out = {}
        cases = {  # name -> (task status, its worker's record: None, or (names it?, heartbeat age))
            "no-record": ("running", None),
            "not-named": ("running", (False, 0)),
            "stale": ("running", (True, 100)),
            "alive": ("running", (True, 1)),
            "pending": ("pending", None),
        }
        for name, (status, record) in cases.items():
            tid = keys.new_task_id()
            task = Task(id=tid, task_type="plain", status=status, lease_id="L", worker_id=name,
                        lease_deadline=now - 100, created_at=now, updated_at=now, available_at=now)
            await q.storage.put(keys.task(q.name, tid), task.to_json())
            if record is not None:
                named, age = record
                leases = {tid: {"lease": "L", "type": "plain"}} if named else {}
                await q.storage.put(keys.worker(q.name, name), json.dumps(
                    {"worker_id": name, "heartbeat_at": now - age, "lease_ttl": 3, "leases": leases}).encode())
            out[name] = await chaos_procs.without_live_lease(q.storage, keys.task(q.name, tid), now, 20.0)
        await q.close()
        return out

    found = asyncio.run(main())
    assert found["alive"] is None and found["pending"] is None
    assert "has no record" in found["no-record"]
    assert "does not name it" in found["not-named"]
    assert "heartbeat is 100s old" in found["stale"]


def test_the_chaos_goes_on_until_it_did_enough_read_from_what_its_processes_left(tmp_path):
    assert chaos_procs.progress(str(tmp_path)) == {}
    (tmp_path / "faults-1.json").write_text(json.dumps({"error": 3, "lost_response": 0, "error:put": 3}))
    (tmp_path / "faults-2.json").write_text(json.dumps({"error": 1, "lost_response": 1}))
    (tmp_path / "faults-3.json").write_text('{"error": ')  # being written: read next time
    (tmp_path / "submits-1.jsonl").write_text(
        json.dumps({"kind": "plain", "ids": ["a"]}) + "\n" + json.dumps({"kind": "graph", "ids": ["b", "c", "d"]})
        + "\n" + json.dumps({"kind": "plain", "raised": "StorageUnavailable"}) + "\n" + '{"kind": "pl')
    done = chaos_procs.progress(str(tmp_path))
    assert done == {"error": 4, "lost_response": 1, "submitted": 4}
    assert chaos_procs.enough(done, {"submitted": 4, "error": 1, "lost_response": 1})
    assert not chaos_procs.enough(done, {"submitted": 5})
    assert not chaos_procs.enough(done, {"landed_error": 1})
