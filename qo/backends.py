"""Resolving a URL to a Storage through the ``qo_storage`` hook."""

from __future__ import annotations

import inspect
from typing import Any

from .errors import ConfigurationError, PluginError
from .plugins import Plugins, get_plugins
from .storage import REQUIRED_METHODS, Storage
from .urls import redact_url, url_scheme

__all__ = ["DEFAULT_URL", "KNOWN_SCHEMES", "check_storage", "default_url", "open_storage", "redact_url", "url_scheme"]

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
    """The Storage serving ``url`` (default :func:`default_url`), from the first plugin that
    claims it, checked against the storage contract (:func:`check_storage`)."""
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
    return check_storage(storage, scheme, plugins)


def check_storage(storage: Any, scheme: str, plugins: Plugins) -> Storage:
    """``storage`` if it has the contract's members: ``PluginError`` naming the first
    async method it lacks (``qo.storage.REQUIRED_METHODS``) and where it comes from, at
    connect rather than at the first claim. A missing ``name`` (the contract gained it
    after its first release) becomes the URL scheme."""
    where = f"{_origin(storage, plugins)} serving {scheme + '://' if scheme else 'bare path'} URLs"
    for member in REQUIRED_METHODS:
        method = getattr(storage, member, None)
        if method is None or not callable(method):
            problem = f"has no method {member}()"
        elif not inspect.iscoroutinefunction(method):
            problem = f"has a {member}() that is not an async method (async def)"
        else:
            continue
        raise PluginError(f"url: the {where} {problem}; a storage backend needs async "
                          f"{', '.join(REQUIRED_METHODS)} (qo.storage.Storage)")
    name = getattr(storage, "name", None)
    if name is None:
        try:
            storage.name = scheme or "local"
            return storage
        except (AttributeError, TypeError):  # __slots__, a frozen class, a read-only property
            pass
    if not isinstance(name, str):
        raise PluginError(f"url: the {where} has no str name (found {type(name).__name__}); "
                          "a storage backend names itself in errors (qo.storage.Storage)")
    return storage


def _origin(storage: Any, plugins: Plugins) -> str:
    """``class mod.Cls of plugin 'x' (distribution 'd')``: the plugin is the one whose
    ``qo_storage`` lives in the class's top-level package, when exactly one does."""
    cls = type(storage)
    top = cls.__module__.split(".")[0]
    names = sorted({impl.plugin_name for impl in plugins.hook.qo_storage.get_hookimpls()
                    if getattr(impl.function, "__module__", "").split(".")[0] == top})
    where = f"class {cls.__module__}.{cls.__qualname__}"
    if len(names) != 1:
        return where
    info = plugins.info.get(names[0])
    dist = f" (distribution {info.distribution!r})" if info is not None and info.distribution else ""
    return f"{where} of plugin {names[0]!r}{dist}"
