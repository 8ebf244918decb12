"""Chaos: 2 producers and 4 workers (processes) on one bucket, storage faults injected in
every process, workers SIGKILLed at random and restarted; then a clean drain and the
invariants (tests/chaos_procs.py). A larger run: benchmarks/chaos.py."""

from __future__ import annotations

import json

import pytest

import chaos_procs

# seconds of chaos per backend: moto serialises writes and Azurite is one node process
# next to the six under test, so the emulated clouds get shorter runs
SECONDS = {"local": 30.0, "s3": 20.0, "azure": 15.0}


@pytest.mark.timeout(170)
def test_chaos_producers_and_killed_workers_under_storage_faults(storage_url, backend, tmp_path):
    report = chaos_procs.run_chaos(storage_url, str(tmp_path / "chaos"), seconds=SECONDS[backend],
                                   producers=2, workers=4, kill_every=(0.5, 2.0), seed=7)
    print(json.dumps(report, indent=1, sort_keys=True))
    assert report["problems"] == [], "\n".join(report["problems"][:30])
    assert report["kills"] >= 5
    assert report["tasks"] >= 50
    assert report["injected"]["error"] > 0 and report["injected"]["lost_response"] > 0
    assert report["injected"]["landed_error"] > 0
