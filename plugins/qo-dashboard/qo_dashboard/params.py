"""Query parameters, checked: a bad one answers 400 naming the field."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from qo import STATUSES, InvalidInput, check_task_id, check_task_type, parse_duration

#: a listing cursor: an index key or a task id, as the dashboard wrote it
CURSOR = re.compile(r"^[A-Za-z0-9_.:/\-]{1,600}\Z")
MAX_LIMIT = 200


def bad(field: str, why: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f"400: bad parameter {field}: {why}\n")


def one(request: web.Request, field: str) -> str | None:
    values = request.query.getall(field, [])
    if len(values) > 1:
        raise bad(field, "given more than once")
    value = values[0].strip() if values else None
    return value or None


def status(request: web.Request, field: str = "status", allowed: tuple[str, ...] = STATUSES) -> str | None:
    value = one(request, field)
    if value is not None and value not in allowed:
        raise bad(field, f"{value[:40]!r} is not one of {', '.join(allowed)}")
    return value


def task_type(request: web.Request, field: str = "type") -> str | None:
    value = one(request, field)
    if value is not None:
        try:
            check_task_type(value, field)
        except InvalidInput:
            raise bad(field, f"{value[:40]!r} is not a task type") from None
    return value


def since(request: web.Request, field: str = "since") -> float | None:
    """A duration back from now (``30m``, ``2h``, ``7d``), in seconds."""
    value = one(request, field)
    if value is None:
        return None
    try:
        seconds = parse_duration(value, field)
    except InvalidInput:
        raise bad(field, f"{value[:40]!r} is not a duration (e.g. 30m, 2h, 7d)") from None
    if seconds <= 0 or seconds > 10 * 365 * 86400:
        raise bad(field, "must be between 1s and 10 years")
    return seconds


def limit(request: web.Request, field: str = "limit", default: int = 50) -> int:
    value = one(request, field)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise bad(field, f"{value[:40]!r} is not an integer") from None
    if not 1 <= n <= MAX_LIMIT:
        raise bad(field, f"must be from 1 to {MAX_LIMIT}")
    return n


def cursor(request: web.Request, field: str = "after") -> str | None:
    value = one(request, field)
    if value is not None and not CURSOR.match(value):
        raise bad(field, "is not a cursor this dashboard wrote")
    return value


def task_id(value: Any, field: str = "id") -> str:
    try:
        check_task_id(value, field)
    except InvalidInput:
        raise bad(field, f"{str(value)[:40]!r} is not a task id") from None
    return value
