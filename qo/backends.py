"""Resolving a URL to a Storage through the ``qo_storage`` hook."""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError
from .plugins import Plugins, get_plugins
from .storage import Storage
from .urls import redact_url, url_scheme

__all__ = ["DEFAULT_URL", "KNOWN_SCHEMES", "default_url", "open_storage", "redact_url", "url_scheme"]

DEFAULT_URL = "./.qo"

#: Where a scheme qo knows of comes from, for the "not installed" hint.
KNOWN_SCHEMES = {
    "s3": "pip install 'qo-queue[s3]' (from a checkout: pip install '.[s3]')",
    "memory": "pip install qo-memory (from a checkout: pip install ./plugins/qo-memory)",
    "az": "pip install qo-azure (from a checkout: pip install ./plugins/qo-azure)",
}


def default_url() -> str:
    """``QO_URL``, else ``url`` from qo.toml / ``[tool.qo]``, else the local default ``./.qo``."""
    from .config import load

    return load()["url"]


def open_storage(
    url: str | None = None, options: dict[str, Any] | None = None, plugins: Plugins | None = None
) -> Storage:
    """The Storage serving ``url`` (default :func:`default_url`), from the first plugin that claims it."""
    url = default_url() if url is None else url
    scheme = url_scheme(url)
    plugins = plugins or get_plugins()
    storage = plugins.hook.qo_storage(url=url, options=dict(options or {}))
    if storage is None:
        installed = ", ".join(f"{s}://" if s else "bare paths" for s in plugins.schemes()) or "none"
        hint = KNOWN_SCHEMES.get(scheme)
        msg = f"url: no storage backend for scheme {scheme + '://' if scheme else 'bare path'}"
        msg += f" (installed: {installed})"
        if hint:
            msg += f"; {scheme}:// needs: {hint}"
        raise ConfigurationError(msg)
    return storage
