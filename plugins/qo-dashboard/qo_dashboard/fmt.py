"""Jinja filters: times relative with the absolute one on hover, ages, numbers, JSON."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(seconds: float | None) -> str:
    """``42 s``, ``3 min``, ``2.5 h``, ``4 d`` (no sign)."""
    if seconds is None:
        return "–"
    s = abs(seconds)
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def relative(ts: float | None, now: float) -> str:
    if ts is None:
        return "–"
    delta = ts - now
    if abs(delta) < 1:
        return "now"
    return f"in {age(delta)}" if delta > 0 else f"{age(delta)} ago"


def num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return f"{int(value):,}"


def usd(value: float) -> str:
    if value < 0.01:
        return f"${value:.4f}"
    if value < 100:
        return f"${value:,.2f}"
    return f"${value:,.0f}"


def per(seconds: float) -> str:
    """A rate's period: ``/s``, ``/min``, ``/h``, else ``per 2.5 s``."""
    return {1.0: "/s", 60.0: "/min", 3600.0: "/h", 86400.0: "/day"}.get(float(seconds), f"per {age(seconds)}")


def pretty(value: Any) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


FILTERS = {"iso": iso, "age": age, "num": num, "usd": usd, "pretty": pretty, "per": per}
