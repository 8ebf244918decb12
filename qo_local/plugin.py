"""Registers the local backends: ``file://`` URLs and bare paths (a directory), ``sqlite://`` (one file)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import qo

#: settings a ``file://`` URL query may hold; the same names are storage options
OPTIONS = ("fsync", "lock_stripes", "mode", "allow_foreign_root")
#: the same for ``sqlite://`` URLs (qo_local.sqlite_storage)
SQLITE_OPTIONS = ("fsync", "mode", "busy_timeout", "allow_foreign_root")


@qo.hookimpl
def qo_storage_schemes() -> list[str]:
    return ["file", "sqlite", ""]


@qo.hookimpl
def qo_storage(url: str, options: dict[str, Any]):
    """A :class:`qo_local.storage.LocalStorage` for ``file://`` URLs and bare paths.

    Settings: storage options, then the ``file://`` URL query (``?mode=group``); a bare
    path has no query (``?`` is part of the name).
    """
    settings: dict[str, Any] = {}
    if "://" in url:
        try:
            parts = urlsplit(url)
        except ValueError:
            raise qo.InvalidInput("url", "malformed file:// URL") from None
        if parts.scheme.lower() == "sqlite":
            return _sqlite(parts, options)
        if parts.scheme.lower() != "file":
            return None
        if parts.netloc not in ("", "localhost"):  # never echo the netloc: it may hold user:password
            raise qo.InvalidInput("url", f"file:// URLs name a local path, not host {parts.hostname or '?'!r}")
        path = unquote(parts.path)
        settings = _query(parts.query)
    else:
        path = url
    from .storage import LocalStorage

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise qo.InvalidInput("options", f"unknown local storage options: {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    return LocalStorage(path, **{**settings, **options})


def _sqlite(parts: Any, options: dict[str, Any]):
    """A :class:`qo_local.sqlite_storage.SqliteStorage` for ``sqlite:///path/to/queue.db``."""
    from .sqlite_storage import SqliteStorage

    if parts.netloc not in ("", "localhost"):
        raise qo.InvalidInput("url", f"sqlite:// URLs name a local file, not host {parts.hostname or '?'!r}")
    if not parts.path or parts.path.endswith("/"):
        raise qo.InvalidInput("url", "an sqlite:// URL names a file: sqlite:///var/lib/qo/queue.db")
    unknown = sorted(set(options) - set(SQLITE_OPTIONS))
    if unknown:
        raise qo.InvalidInput(
            "options", f"unknown sqlite storage options: {', '.join(unknown)} (known: {', '.join(SQLITE_OPTIONS)})")
    return SqliteStorage(unquote(parts.path), **{**_query(parts.query, SQLITE_OPTIONS), **options})


def _query(query: str, known: tuple[str, ...] = OPTIONS) -> dict[str, Any]:
    """The settings of a ``file://`` URL query; InvalidInput for an unknown name or a bad value."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise qo.InvalidInput("url", "malformed query string") from None
    settings: dict[str, Any] = {}
    for name, value in pairs:
        if name not in known:
            raise qo.InvalidInput("url", f"unknown query parameter {name[:40]!r} (known: {', '.join(known)})")
        settings[name] = value
    if "lock_stripes" in settings:
        try:
            settings["lock_stripes"] = int(settings["lock_stripes"])
        except ValueError:
            raise qo.InvalidInput("lock_stripes", f"{settings['lock_stripes'][:40]!r} is not an integer from 1 to 65536") from None
    return settings
