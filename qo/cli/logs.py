"""Logging for the long-running commands (``qo worker``, ``qo schedule run``), set up in one place.

``setup_logging(level, fmt)`` logs to stderr at ``level`` as ``text`` (one readable line
per record, a traceback below it) or ``json`` (one JSON object per line, for log
shippers). The storage SDKs' loggers are held at WARNING unless the level is DEBUG: at
INFO the Azure SDK logs every HTTP request with its headers, botocore says where it
found credentials.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Callable

import click

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

#: third-party loggers kept at WARNING unless --log-level debug
SDK_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "aiohttp", "azure",
               "azure.core", "azure.core.pipeline.policies.http_logging_policy", "azure.storage", "asyncio")

#: LogRecord attributes that ``extra=`` may set and the JSON format prints (qo/worker_log.py)
FIELDS = ("event", "task_id", "task_type", "queue", "attempt", "duration_ms", "delay_s", "worker_id", "error",
          "traceback", "interval_s", "tasks_per_s", "running", "started", "completed", "retried", "failed",
          "timed_out")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, the qo fields a record carries (:data:`FIELDS`), and ``traceback`` for a
    record logged with an exception. Never more than one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_info and "traceback" not in out:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text and "traceback" not in out:
            out["traceback"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str = "INFO", fmt: str = "text", stream: Any = None) -> logging.Handler:
    """Log to ``stream`` (stderr) at ``level`` in ``fmt``; SDK loggers at WARNING unless DEBUG.

    Replaces the handlers a previous call installed (a process may run commands more
    than once, e.g. tests), leaving any other handler alone. Returns the handler.
    """
    level = level.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_qo_cli", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._qo_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(make_formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    sdk_level = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(sdk_level)
    return handler


def configure(log_level: str, log_format: str | None, config: Any = None) -> Any:
    """Set up logging from the command's flags over the configuration; returns the config."""
    from ..config import load

    config = (config or load()).with_flags(log_format=log_format)
    setup_logging(log_level, config["log_format"])
    return config


def location(url: str) -> str:
    """Where a queue lives, for a start-up line: a local store's absolute path, else the
    URL with anything that could be a secret redacted."""
    import os
    from urllib.parse import unquote, urlsplit

    from ..backends import redact_url, url_scheme

    try:
        scheme = url_scheme(url)
    except Exception:
        return redact_url(url)
    if scheme == "":
        return os.path.abspath(url)
    if scheme == "file":
        path = os.path.abspath(unquote(urlsplit(url).path) or ".")
        query = redact_url(url).partition("?")[2]
        return path + (f"?{query}" if query else "")
    return redact_url(url)


def log_options(fn: Callable) -> Callable:
    """``--log-level`` and ``--log-format`` (default: QO_LOG_FORMAT, qo.toml, else text:
    resolved by :func:`configure`)."""
    fn = click.option("--log-format", type=click.Choice(LOG_FORMATS), default=None,
                      help="text: one readable line per record; json: one JSON object per line "
                           "(ts, level, logger, message, and a task event's fields). "
                           "[default: QO_LOG_FORMAT, qo.toml, else text]")(fn)
    fn = click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
                      show_default=True,
                      help="Logging to stderr at this level (debug also shows the storage SDKs' own logs).")(fn)
    return fn
