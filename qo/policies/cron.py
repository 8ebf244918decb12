"""Default ``qo_next_fire``: cron expressions (croniter) in an IANA timezone, DST-safe.

Expressions have 5 fields (minute hour day-of-month month day-of-week) or 6 with
seconds LAST (croniter's convention: ``"*/10 * * * * 30"`` is second 30 of every tenth
minute). The aliases ``@yearly @annually @monthly @weekly @daily @midnight @hourly``
are accepted.

Times are computed on the wall clock of the schedule's timezone. Daylight-saving
transitions follow Vixie cron's rule, decided by the hour field:

- **Fixed-hour jobs** (the hour field does not start with ``*``; e.g. ``30 2 * * *``)
  fire once per matching wall-clock time. On a spring-forward day a time inside the
  skipped hour fires once, at the first instant after the gap (croniter's choice:
  03:00 local for a 02:30 job in Europe/Berlin and America/New_York; several times in
  the gap collapse into that one fire). On a fall-back day a time inside the repeated
  hour fires on the first pass only (croniter alone would fire it twice).
- **Interval jobs** (the hour field is ``*`` or ``*/n``; e.g. ``*/5 * * * *``) follow
  real time: wall times inside a skipped hour do not exist and are not fired, and both
  passes of a repeated hour fire, so the gaps between fires stay as written.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, CroniterError, croniter

from qo.errors import InvalidInput
from qo.model import _short
from qo.hookspecs import hookimpl
from qo.schedule_model import check_cron_length, check_timezone

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: Candidates looked at for one answer: a per-second fixed-hour job skips 3600 in a
#: repeated hour; far beyond that something is wrong and "never" is the safe answer.
MAX_CANDIDATES = 20_000


def claims(expr: Any) -> bool:
    """Whether ``expr`` is cron syntax (first field a digit or ``*``, or an ``@`` alias).

    Other plugins give other kinds of schedule another syntax (``every 90s``); an
    expression claimed here that does not parse is an error, not somebody else's.
    """
    if not isinstance(expr, str) or not expr.strip():
        return False
    text = expr.strip()
    return text.lower() in ALIASES or text[0].isdigit() or text[0] == "*"


def check_cron(expr: Any, field: str = "cron") -> str:
    """The normalised expression (single spaces, aliases expanded), or ``InvalidInput``.

    An expression over ``MAX_CRON_LENGTH`` characters is refused before it is parsed
    or cached (a megabyte of cron would cost seconds of CPU and a megabyte of cache)."""
    return _parse_cron(check_cron_length(expr, field), field)


@functools.lru_cache(maxsize=1024)
def _parse_cron(expr: Any, field: str) -> str:
    """``check_cron`` after the length check; cached (a scheduler parses each schedule's
    expression on every fire computation)."""
    if not isinstance(expr, str) or not expr.strip():
        raise InvalidInput(field, "must be a cron expression such as '*/5 * * * *' or '0 3 * * *'")
    text = " ".join(expr.split())
    if text.startswith("@") and text.lower() not in ALIASES:
        raise InvalidInput(field, f"{_short(expr)} is not a known alias (known: {', '.join(ALIASES)})")
    text = ALIASES.get(text.lower(), text)
    fields = text.split(" ")
    if len(fields) not in (5, 6):
        raise InvalidInput(field, f"{_short(expr)} has {len(fields)} fields; expected 5 (minute hour day month "
                           "weekday) or 6 (the same, then seconds)")
    try:
        croniter(text)
    except (CroniterError, ValueError, KeyError) as exc:
        raise InvalidInput(field, f"{_short(expr)} is not a valid cron expression: {_diagnose(fields, exc)}") from None
    return text


FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week", "second")


def _diagnose(fields: list[str], exc: Exception) -> str:
    """Which field croniter refused, tried one at a time with the others ``*``."""
    for i, value in enumerate(fields):
        probe = ["*"] * len(fields)
        probe[i] = value
        try:
            croniter(" ".join(probe))
        except (CroniterError, ValueError, KeyError) as field_exc:
            reason = str(field_exc).split("] ", 1)[-1].replace("is not acceptable, ", "")
            reason = "" if reason == "is not acceptable" else f" ({reason})"
            return f"the {FIELD_NAMES[i]} field {value!r} is not valid{reason}"
    return str(exc) or type(exc).__name__


def is_interval(expr: str) -> bool:
    """Whether the job follows real time across DST (hour field ``*`` or ``*/n``)."""
    return expr.split(" ")[1].startswith("*")


def _second_pass(local: datetime) -> bool:
    """``local`` (from ``astimezone``) is the repeat of a wall time on a fall-back day."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _after_gap(instant: datetime, tz: ZoneInfo) -> bool:
    """The UTC offset changed in the second before ``instant`` (a transition just happened)."""
    return (instant - timedelta(seconds=1)).astimezone(tz).utcoffset() != instant.astimezone(tz).utcoffset()


def next_fire(expr: str, tz: ZoneInfo, after: datetime) -> datetime | None:
    """The first fire time of ``expr`` in ``tz`` strictly after ``after`` (aware).

    ``expr`` must have passed :func:`check_cron`. One that never fires (``0 0 30 2 *``)
    is an ``InvalidInput`` naming ``cron``."""
    if after.tzinfo is None:
        raise InvalidInput("after", "must be timezone-aware")
    interval = is_interval(expr)
    it = croniter(expr, after.astimezone(tz))
    for _ in range(MAX_CANDIDATES):
        try:
            candidate = it.get_next(datetime)
        except CroniterBadDateError:
            raise InvalidInput("cron", f"{_short(expr)} never fires (no such date)") from None
        instant = candidate.astimezone(timezone.utc)
        if instant <= after:
            continue  # never trust an iterator across a transition blindly
        local = instant.astimezone(tz)  # fold set correctly by zoneinfo
        if _second_pass(local) and not interval:
            continue  # a fixed-hour job fires a repeated wall time once: on the first pass
        if interval and _after_gap(instant, tz) and not croniter.match(expr, local.replace(tzinfo=None)):
            continue  # croniter moved a wall time out of the gap; real time never had it
        return local
    raise InvalidInput("cron", f"{_short(expr)}: no fire time found after {after.isoformat()}")


@hookimpl
def qo_next_fire(schedule: Any, after: datetime) -> datetime | None:
    """The next fire time of a cron schedule; ``None`` for an expression that is not
    cron syntax (another plugin's kind). A malformed cron expression, one over
    ``MAX_CRON_LENGTH`` characters (checked first, so a huge stored one costs no parsing),
    an unknown timezone or a cron that never fires raises ``InvalidInput`` naming the field."""
    cron = check_cron_length(getattr(schedule, "cron", None))  # a stored record may hold anything
    if not claims(cron):
        return None
    tz = check_timezone(getattr(schedule, "timezone", None) or "UTC")
    return next_fire(check_cron(cron), tz, after)
