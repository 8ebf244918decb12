"""Pure parsers for command-line values: durations, times and JSON input.

Each raises :class:`qo.InvalidInput` naming the option it parses, so a bad value
becomes one ``error: --delay: ...`` line and exit status 1.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import IO, Any

from ..errors import InvalidInput

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)


def parse_duration(text: str, option: str = "--delay") -> float:
    """Seconds in ``text``: ``10s``, ``5m``, ``2h``, ``1d``, ``1.5s``, ``250ms`` or a bare number."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInput(option, f"{text!r} is not a duration (e.g. 30, 10s, 5m, 2h, 1d, 1.5s, 250ms)")
    seconds = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    if not math.isfinite(seconds):
        raise InvalidInput(option, f"{text!r} is too large")
    return seconds


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


def parse_json_input(text: str | None, option: str = "--input", stdin: IO[str] | None = None) -> Any:
    """The JSON value of ``text``; ``@path`` reads a file, ``@-`` standard input; None stays None."""
    if text is None:
        return None
    source = "value"
    if text.startswith("@"):
        path = text[1:]
        if path == "-":
            source, text = "standard input", (stdin or sys.stdin).read()
        else:
            if not path:
                raise InvalidInput(option, "'@' must be followed by a file path, or '-' for standard input")
            try:
                with open(path, encoding="utf-8") as f:
                    source, text = f"file {path!r}", f.read()
            except (OSError, UnicodeDecodeError) as exc:
                reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
                raise InvalidInput(option, f"cannot read {path!r}: {reason}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidInput(option, f"invalid JSON in {source}: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
