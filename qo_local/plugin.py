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
        parts = urlsplit(url)
        if parts.scheme.lower() != "file":
            return None
        if parts.netloc not in ("", "localhost"):
            raise qo.InvalidInput("url", f"file:// URLs name a local path, not host {parts.netloc!r}")
        path = unquote(parts.path)
    else:
        path = url
    from .storage import LocalStorage

    return LocalStorage(path, **options)
