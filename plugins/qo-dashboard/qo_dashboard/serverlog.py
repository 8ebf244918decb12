"""The dashboard's log on stderr (``qo dashboard`` sets it up): one line per message. A
malformed request (a request line over 8 KiB, garbage sent to the port) is one line
saying so, never a traceback; any other error keeps its traceback (it is a bug)."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

LOGGER = "qo_dashboard"
#: the logger handed to aiohttp's server (AppRunner(logger=...)) instead of aiohttp.server
SERVER_LOGGER = "qo_dashboard.server"
MAX_DETAIL = 160


class OneLine(logging.Formatter):
    """``qo dashboard: message``; a bad request's error as its status and a short reason."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            detail = " ".join(str(exc.message).split())
            if len(detail) > MAX_DETAIL:
                detail = detail[:MAX_DETAIL] + "..."
            return f"qo dashboard: {record.getMessage()}: {exc.code} {detail}"
        return super().format(record)


def configure() -> logging.Logger:
    """Send the dashboard's log to stderr, one line a message; the logger for aiohttp's server."""
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(OneLine("qo dashboard: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logging.getLogger(SERVER_LOGGER)
