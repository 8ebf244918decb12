"""The engine's fast paths give what the plain code they replace gives (no timing here:
benchmarks/bench.py judges speed)."""

from __future__ import annotations

import copy
import json

import attrs

from qo import keys
from qo.model import Task, dumps
from qo.packs import Pack, clone, copy_json


def _pack() -> Pack:
    pid = keys.new_pack_id(3)
    tasks = [Task(id=keys.entry_id(pid, i), task_type="t", input={"i": i, "deep": [{"x": [1, 2.5, None]}]},
                  created_at=1.0, available_at=1.0, updated_at=1.0) for i in range(3)]
    pack = Pack.build(pid, tasks, 1.0)
    pack.lease = {"worker_id": "w", "lease_id": "l", "claimed_at": 2.0}
    pack.extra = {"future": {"nested": [1, {"a": True}]}}
    return pack


def test_clone_is_a_deep_copy_equal_to_deepcopy():
    pack = _pack()
    new = clone(pack)
    assert new == copy.deepcopy(pack) == pack
    assert new.to_json() == pack.to_json()
    # nothing mutable is shared: changing the copy anywhere leaves the original as it was
    before = pack.to_json()
    new.entries[0]["input"]["deep"][0]["x"].append(3)
    new.template["status"] = "running"
    new.lease["lease_id"] = "other"
    new.extra["future"]["nested"][1]["a"] = False
    new.entries.append({})
    assert pack.to_json() == before


def test_copy_json_falls_back_to_deepcopy_for_other_types():
    class Box:
        def __init__(self, v):
            self.v = v

    value = {"a": [Box([1])], "t": (1, [2])}
    out = copy_json(value)
    assert out["a"][0] is not value["a"][0] and out["a"][0].v == [1] and out["a"][0].v is not value["a"][0].v
    assert out["t"] == (1, [2]) and out["t"][1] is not value["t"][1]


def test_to_dict_and_from_dict_match_attrs():
    task = Task(id="0" * 24, task_type="t", input={"x": 1}, extra={"newer": 1})
    d = task.to_dict()
    assert d == {**task.extra, **{k: v for k, v in attrs.asdict(task, recurse=False).items() if k != "extra"}}
    assert list(d)[0] == "newer"  # extra first, then the fields in their order, as before
    assert Task.from_dict(d) == task
    plain = Task(id="0" * 24, task_type="t")
    assert list(plain.to_dict()) == [f.name for f in attrs.fields(Task) if f.name != "extra"]
    again = Task.from_dict(plain.to_dict())
    assert again == plain and again.extra == {}
    pack = _pack()
    assert Pack.from_dict(pack.to_dict()) == pack and pack.to_dict()["future"] == {"nested": [1, {"a": True}]}


def test_dumps_is_canonical_json():
    value = {"b": [1.5, None, "é"], "a": {"z": 1, "y": True}}
    assert dumps(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False,
                                      ensure_ascii=False).encode()
    for bad in (float("nan"), float("inf")):
        try:
            dumps({"x": bad})
        except ValueError:
            pass
        else:
            raise AssertionError("NaN/Infinity must be refused")
