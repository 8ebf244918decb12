"""Registers the filesystem backend for ``file://`` URLs and bare paths."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import qo


@qo.hookimpl
def qo_storage_schemes() -> list[str]:
    return ["file", ""]


@qo.hookimpl
def qo_storage(url: str, options: dict[str, Any]):
    if "://" in url:
        try:
            parts = urlsplit(url)
        except ValueError:
            raise qo.InvalidInput("url", "malformed file:// URL") from None
        if parts.scheme.lower() != "file":
            return None
        if parts.netloc not in ("", "localhost"):  # never echo the netloc: it may hold user:password
            raise qo.InvalidInput("url", f"file:// URLs name a local path, not host {parts.hostname or '?'!r}")
        path = unquote(parts.path)
    else:
        path = url
    from .storage import LocalStorage

    unknown = sorted(set(options) - {"fsync", "lock_stripes"})
    if unknown:
        raise qo.InvalidInput("options", f"unknown local storage options: {', '.join(unknown)} (known: fsync, lock_stripes)")
    return LocalStorage(path, **options)
