"""Durations as people write them (``10s``, ``5m``, ``2h``, ``7d``, ``250ms``), for the
command line and for settings stored in the bucket."""

from __future__ import annotations

import math
import re

from .errors import InvalidInput

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)


def parse_duration(text: str, option: str = "--delay") -> float:
    """Seconds in ``text``: ``10s``, ``5m``, ``2h``, ``1d``, ``1.5s``, ``250ms`` or a bare number."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        shown = repr(text) if not isinstance(text, str) or len(text) <= 60 else repr(text[:57] + "...")
        raise InvalidInput(option, f"{shown} is not a duration (e.g. 30, 10s, 5m, 2h, 1d, 1.5s, 250ms)")
    seconds = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    if not math.isfinite(seconds):
        raise InvalidInput(option, f"{text!r} is too large")
    return seconds


def format_duration(seconds: float) -> str:
    """The largest whole unit that states ``seconds`` exactly, else seconds: ``7d``, ``90m``."""
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds:g}s"
