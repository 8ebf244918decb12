"""The dashboard's state, one dict under one typed application key (mutable while serving)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

STATE: web.AppKey[dict[str, Any]] = web.AppKey("qo_dashboard", dict)


def state(request: web.Request) -> dict[str, Any]:
    return request.app[STATE]
