"""The fast record codec reads and writes what json does (qo/stored.py ``loads``,
qo/model.py ``record_json``): orjson on the common path, json for what orjson reads
differently or refuses. Differential tests on generated text and values."""

from __future__ import annotations

import json
import math
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from qo import stored
from qo.model import Task, dumps, record_json


def same(a, b) -> bool:
    """Equal as JSON values and as Python types: 1 is not 1.0, -0.0 is not 0.0, NaN is NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


_scalars = (st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True)
            | st.integers() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
            | st.sampled_from([2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -(2 ** 63), -(2 ** 63) - 1, -(2 ** 64)])
            | st.text() | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)

# number literals json reads (and some it does not): long mantissas, big exponents,
# negative zero, 19 and 20 digits around 2**64
_digits = st.text(alphabet="0123456789", min_size=1, max_size=24)
_numbers = st.builds(lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
                     st.sampled_from(["", "-"]), _digits,
                     st.sampled_from(["", ".5", ".0"]) | st.builds(lambda d: "." + d, _digits),
                     st.sampled_from(["", "e5", "E-7", "e+308", "e400", "e-400", "e-320"]))


@settings(max_examples=200, deadline=None)
@given(_values, st.booleans())
def test_loads_reads_generated_json_as_json_does(value, ascii_only):
    text = json.dumps({"v": value}, ensure_ascii=ascii_only)  # NaN/Infinity literals included
    assert same(stored.loads(text), json.loads(text))


@settings(max_examples=200, deadline=None)
@given(_numbers)
def test_loads_reads_number_literals_as_json_does(literal):
    text = '{"n":' + literal + "}"
    try:
        expected = json.loads(text)
    except ValueError:
        try:
            stored.loads(text)
        except ValueError:
            return
        raise AssertionError(f"{text} is refused by json but read by loads")
    assert same(stored.loads(text), expected), text


def test_loads_refuses_what_json_refuses_with_json_s_message():
    for text in ['{"a":1', '{"a":"\x01"}', "\ufeff{}", "", "{'a':1}", '{"a":01}', "[1,]"]:
        try:
            json.loads(text)
        except ValueError as exc:
            expected = str(exc)
        else:
            raise AssertionError(text)
        try:
            stored.loads(text)
        except ValueError as exc:
            assert str(exc) == expected
        else:
            raise AssertionError(f"{text!r} read")


def test_loads_keeps_ints_over_64_bits_exact():
    """orjson alone reads 123456789012345678901234567890 as a float: the one silent
    difference the 19-digit rule exists for (the shortest: one below -2**63)."""
    assert stored.loads('{"a":123456789012345678901234567890}') == {"a": 123456789012345678901234567890}
    for n in (2 ** 64, -(2 ** 63) - 1, 2 ** 63, 2 ** 64 - 1):
        assert same(stored.loads('{"a":%d}' % n), {"a": n})


def keys_sorted(value) -> bool:
    if isinstance(value, list):
        return all(keys_sorted(v) for v in value)
    if isinstance(value, dict):
        return list(value) == sorted(value) and all(keys_sorted(v) for v in value.values())
    return True


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _values, max_size=6))
def test_record_json_reads_back_as_dumps_does(record):
    """The same values, keys sorted at every level."""
    try:
        canonical = dumps(record)
    except (ValueError, UnicodeEncodeError):  # NaN, Infinity, a lone surrogate: see below
        return
    fast = record_json(record)
    assert same(json.loads(fast), json.loads(canonical))
    assert keys_sorted(json.loads(fast))


def test_record_json_falls_back_to_dumps_for_what_orjson_refuses():
    for record in ({"a": {1: "int key"}}, {"a": 2 ** 70}, {"b": [{"x": 2 ** 64}]}):
        assert record_json(record) == dumps(record)
    for refused in ({"a": "\ud800"},):  # dumps refuses it as ever (a task can never hold one)
        try:
            record_json(refused)
        except UnicodeEncodeError:
            pass
        else:
            raise AssertionError("a lone surrogate was written")


def test_a_task_round_trips_through_the_fast_codec():
    task = Task(id="01a22bdb5382000060ee1d1e", task_type="t", input={"f": 1e-7, "n": 2 ** 70, "s": "é😀"},
                created_at=1796032123.7786603, available_at=1796032123.7786603, updated_at=1e16)
    again = Task.from_json(task.to_json())
    assert same(again.to_dict(), task.to_dict())
