"""Reading what is in the bucket, defensively: the bucket may hold anything.

Every object qo reads back (a task, a schedule, a worker record, a limit, an
idempotency record) was written by some process of some version, or by hand, or was
cut short. ``decode`` turns its bytes into a dict and ``check_fields`` checks each
field against what this release needs; anything else raises :class:`CorruptObject`
naming the key and why. That one error class is what every loop catches: one bad
object costs at most itself (docs/architecture.md, "What failure looks like").

:class:`BadObjects` logs each bad key once (WARNING, with the reason) and counts it.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import re
from typing import Any, Callable

import orjson

from .errors import CorruptObject

log = logging.getLogger("qo.bad_objects")

#: Stored JSON nested deeper than this is refused before ``json`` recurses into it.
MAX_DEPTH = 200
#: A value a user hands in (a task's input, a handler's output, a schedule's input, JSON
#: on the command line) may nest at most this deep: half of ``MAX_DEPTH``, so the object
#: that stores it (a task, a schedule) is always readable again, with room to spare.
MAX_VALUE_DEPTH = MAX_DEPTH // 2


def decode(data: bytes, key: str, *, backend: str = "") -> dict[str, Any]:
    """The JSON object stored at ``key``; ``CorruptObject`` for anything else."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError:
        raise CorruptObject(key, "not UTF-8 text", backend=backend) from None
    if too_deep(text):
        raise CorruptObject(key, f"JSON nested deeper than {MAX_DEPTH} levels", backend=backend)
    try:
        value = loads(text)
    except (ValueError, RecursionError) as exc:
        raise CorruptObject(key, f"not JSON ({_first_line(exc)})", backend=backend) from None
    if not isinstance(value, dict):
        raise CorruptObject(key, f"a JSON {type(value).__name__} where an object is expected", backend=backend)
    return value


#: a run of 19 digits (every digit read as 0): a number orjson may read as a float where
#: json reads an int (one beyond 64 bits, as -9223372036854775809 is), or a long
#: mantissa; json reads those texts. (bytes.translate and a substring search: a regex
#: for 19 digits costs more than json.loads on a task.)
_DIGIT_RUN = b"0" * 19
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")


def loads(text: str) -> Any:
    """``json.loads(text)``, faster: orjson reads the common text, and json whatever
    orjson reads otherwise (a number of 19+ digits: orjson makes an int beyond 64 bits a
    float) or refuses (NaN, Infinity, 1e400, an escaped lone surrogate: json reads them;
    what both refuse raises json's error, with json's message). tests/test_codec.py
    checks that the two agree on generated text."""
    raw = text.encode("utf-8", "surrogatepass")  # (a lone surrogate: orjson refuses it, json decides)
    if _DIGIT_RUN not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``text`` nests arrays and objects more than ``limit`` deep, found
    without recursion (so ``json`` is never handed text that would overflow the stack).
    Cheap for ordinary text: only one with more than ``limit`` brackets in all (inside
    strings too) is measured. Strings are cut out first (an unterminated one runs to the
    end of the text), then the depth is the running sum over the brackets left."""
    if text.count("[") + text.count("{") <= limit:
        return False
    bare = _STRING.sub("", text)
    cut = bare.find('"')  # a string that never ends: nothing after it is structure
    if cut >= 0:
        bare = bare[:cut]
    bare = _NOT_BRACKET.sub("", bare)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, bare)), default=0) > limit


#: a JSON string as a reader of the text sees it: from a quote to the next one not
#: escaped by a backslash (the backslash escapes whatever follows it)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


# -- field checks: each returns True for a value this release can use -----------------


def is_int(v: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def is_number(v: Any) -> bool:
    t = type(v)
    if t is float or t is int:  # the common case, without the isinstance calls
        return math.isfinite(v)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_positive(v: Any) -> bool:
    return is_number(v) and v > 0


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    fast = _OPTIONAL.get(check)  # the same test in one call, for the common checks
    if fast is not None:
        return fast
    return lambda v: v is None or check(v)


def is_str(v: Any) -> bool:
    return isinstance(v, str)


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _optional_number(v: Any) -> bool:
    return v is None or is_number(v)


def _optional_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _optional_dict(v: Any) -> bool:
    return v is None or isinstance(v, dict)


_OPTIONAL: dict[Callable[[Any], bool], Callable[[Any], bool]] = {
    is_number: _optional_number, is_str: _optional_str, is_dict: _optional_dict}


def is_list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and (not v or all(check(x) for x in v))


def matches(pattern: Any) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and pattern.match(v) is not None


def one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in values


def anything(v: Any) -> bool:
    return True


def check_fields(d: dict[str, Any], key: str, spec: dict[str, Callable[[Any], bool]], *,
                 required: tuple[str, ...] = (), backend: str = "") -> dict[str, Any]:
    """``d`` unchanged if every field in ``spec`` that is present passes its check and
    every ``required`` one is present; ``CorruptObject`` naming the first that does not.
    Fields not in ``spec`` are not looked at (a newer release's, kept as they are)."""
    for name in required:
        if name not in d:
            raise CorruptObject(key, f"field {name!r} is missing", backend=backend)
    for name, check in spec.items():
        if name in d and not check(d[name]):
            raise CorruptObject(key, f"field {name!r} has the unusable value {_short(d[name])}", backend=backend)
    return d


def _short(value: Any) -> str:
    try:
        r = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        r = repr(type(value))
    return r if len(r) <= 60 else r[:57] + "..."


# -- reporting ---------------------------------------------------------------------------


class BadObjects:
    """The unreadable objects one process met: each logged once (key and reason) and
    counted. Bounded: remembers the last ``capacity`` keys. With the etag of the bad
    version, a caller that lists before it reads (the listing carries etags) can skip
    re-reading an object it already knows to be bad: ``known(key, etag)``."""

    def __init__(self, capacity: int = 10000):
        self.capacity = capacity
        self.seen: collections.OrderedDict[str, tuple[str, str | None]] = collections.OrderedDict()
        self.count = 0

    def report(self, exc: CorruptObject, what: str = "skipped", *, etag: str | None = None) -> None:
        """Log ``exc`` once per key (again if its reason changes) and count it."""
        self.count += 1
        before = self.seen.pop(exc.key, None)
        self.seen[exc.key] = (exc.reason, etag if etag is not None else (before[1] if before else None))
        while len(self.seen) > self.capacity:
            self.seen.popitem(last=False)
        if before is None or before[0] != exc.reason:
            log.warning("unreadable object %s: %s (%s; `qo doctor --scan` lists every one)",
                        exc.key, exc.reason, what)

    def remember(self, key: str, etag: str) -> None:
        """The unreadable version of ``key`` reported (by a reader that had no etag) is ``etag``."""
        if key in self.seen:
            self.seen[key] = (self.seen[key][0], etag)

    def known(self, key: str, etag: str | None) -> bool:
        """This version of ``key`` was found unreadable before."""
        seen = self.seen.get(key)
        return seen is not None and etag is not None and seen[1] == etag

    def __len__(self) -> int:
        return len(self.seen)
