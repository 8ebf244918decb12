"""Pure parsers for command-line values: durations, times and JSON input.

Each raises :class:`qo.InvalidInput` naming the option it parses, so a bad value
becomes one ``error: --delay: ...`` line and exit status 1. JSON input is bounded in
size and depth before it is parsed (``parse_json_input``).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from typing import IO, Any

from ..durations import parse_duration
from ..errors import InvalidInput
from .. import model
from ..model import MAX_INPUT_BYTES
from ..stored import MAX_VALUE_DEPTH, too_deep

#: ``qo submit-graph``'s JSON holds many tasks' inputs: it may be this large.
MAX_GRAPH_BYTES = 64 * MAX_INPUT_BYTES

def parse_time(text: str, option: str = "--at", now: datetime | None = None) -> datetime:
    """An aware datetime from ISO-8601 ``text`` with ``Z`` or an offset, or ``now``.

    A naive time is an error: which timezone was meant cannot be guessed.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(option, "must be an ISO-8601 time such as 2030-01-02T03:04:05Z, or 'now'")
    value = text.strip()
    if value.lower() == "now":
        return now if now is not None else datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(option, f"{text!r} is not an ISO-8601 time (e.g. 2030-01-02T03:04:05Z)") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidInput(option, f"{text!r} has no timezone: end it with Z (UTC) or an offset such as +02:00")
    return when


def delay_to_time(seconds: float, now: float, option: str = "--delay") -> datetime:
    """The aware UTC datetime ``seconds`` after epoch time ``now``."""
    try:
        return datetime.fromtimestamp(now, tz=timezone.utc) + timedelta(seconds=seconds)
    except (OverflowError, ValueError):
        raise InvalidInput(option, f"{seconds:g} seconds from now is out of range") from None


def parse_json_input(text: str | None, option: str = "--input", stdin: IO[str] | None = None,
                     limit: int | None = None, depth: int = MAX_VALUE_DEPTH) -> Any:
    """The JSON value of ``text``; ``@path`` reads a file, ``@-`` standard input; None stays None.

    Bounded before it is parsed: a file or standard input is read at most ``limit`` + 1
    bytes (default ``model.MAX_PAYLOAD_BYTES``, one more than a task's input may be, so a
    larger one is refused without being read whole: ``@/dev/zero`` ends), and JSON nested more than ``depth``
    levels (``stored.MAX_VALUE_DEPTH``, as for a task's input) is refused before ``json``
    recurses into it. Each refusal is an ``InvalidInput`` naming ``option``."""
    if text is None:
        return None
    limit = model.MAX_PAYLOAD_BYTES if limit is None else limit
    source = "value"
    if text.startswith("@"):
        path = text[1:]
        if path == "-":
            source = "standard input"
            text = _read_bounded(stdin or sys.stdin, source, option, limit)
        else:
            if not path:
                raise InvalidInput(option, "'@' must be followed by a file path, or '-' for standard input")
            source = f"file {path!r}"
            try:
                with open(path, "rb") as f:
                    text = _read_bounded(f, source, option, limit)
            except OSError as exc:
                raise InvalidInput(option, f"cannot read {path!r}: {exc.strerror or exc}") from None
    elif len(text) > limit:  # characters: never more than its bytes
        raise InvalidInput(option, _too_large("the value", limit))
    if too_deep(text, depth):
        raise InvalidInput(option, f"the JSON in {source} is nested more than {depth} levels deep "
                           "(arrays and objects); that is the limit")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # not reached after the depth check; kept as the last guard
        raise InvalidInput(option, f"the JSON in {source} is nested too deeply") from None
    except ValueError as exc:
        raise InvalidInput(option, f"invalid JSON in {source}: {exc}") from None


def _read_bounded(stream: IO[Any], source: str, option: str, limit: int) -> str:
    """At most ``limit`` bytes of ``stream`` as UTF-8 text; ``InvalidInput`` naming
    ``option`` if there is more (only ``limit`` + 1 bytes are ever read) or it is not UTF-8.
    A text stream is read through its binary buffer when it has one."""
    raw = getattr(stream, "buffer", stream)
    data = raw.read(limit + 1)
    if isinstance(data, str):  # a text stream without a buffer: characters <= bytes
        if len(data) > limit or len(data.encode("utf-8", "surrogatepass")) > limit:
            raise InvalidInput(option, _too_large(source, limit))
        return data
    if len(data) > limit:
        raise InvalidInput(option, _too_large(source, limit))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(option, f"cannot read {source}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _too_large(source: str, limit: int) -> str:
    return f"{source} is larger than {limit} bytes, the limit (whitespace counts: write the JSON compactly)"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
