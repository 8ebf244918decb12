"""The qo plugin: serves ``memory://`` URLs (entry point ``memory`` in the ``qo`` group)."""

from __future__ import annotations

from typing import Any

import qo

from .storage import MemoryStorage


@qo.hookimpl
def qo_storage_schemes() -> list[str]:
    return ["memory"]


@qo.hookimpl
def qo_storage(url: str, options: dict[str, Any]) -> MemoryStorage | None:
    if not url.lower().startswith("memory://"):
        return None  # not ours: the next plugin is asked
    return MemoryStorage(url)
