"""Loading plugins: the ``qo`` entry-point group, blocking by name, direct registration.

Loading is a memoised factory (:func:`get_plugins`) called by the app, never an import
side effect. A plugin that fails to import, or implements a hook wrongly, is reported
with its name and the reason and left out; it does not take qo down.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from typing import Any, Iterable

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qo"
#: Built-ins the engine cannot work without; configuration cannot block these.
ESSENTIAL = frozenset({"retry", "cron"})


@attrs.define
class PluginInfo:
    """What ``qo plugins`` shows about one plugin."""

    name: str
    status: str  # "loaded" | "blocked" | "broken"
    distribution: str | None = None
    version: str | None = None
    source: str | None = None  # entry-point value or "registered"
    hooks: list[str] = attrs.field(factory=list)
    error: str | None = None


def disabled_from_env(value: str | None = None) -> frozenset[str]:
    """Plugins not to load: ``value``, else ``QO_DISABLE_PLUGINS`` (comma or space
    separated), else ``disable_plugins`` from qo.toml / ``[tool.qo]``."""
    if value is None:
        from .config import load

        return frozenset(load()["disable_plugins"])
    return frozenset(n.strip() for n in value.replace(",", " ").split() if n.strip())


class Plugins:
    """A pluggy manager with qo's hook specification and a record of what was loaded."""

    def __init__(self, disabled: Iterable[str] = ()):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.disabled = frozenset(disabled)
        self.info: dict[str, PluginInfo] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def load_entry_points(self) -> None:
        """Register every plugin of the ``qo`` entry-point group not blocked by name."""
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in self.info:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                status="loaded",
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
                source=ep.value,
            )
            self.info[ep.name] = info
            if ep.name in self.disabled and ep.name not in ESSENTIAL:
                info.status = "blocked"
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take qo down
                self._broken(info, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._register(obj, info)

    def register(self, obj: Any, name: str) -> None:
        """Register a plugin object directly (tests, embedding applications)."""
        if name in self.info and self.info[name].status == "loaded":
            raise PluginError(f"a plugin named {name!r} is already registered")
        info = PluginInfo(name=name, status="loaded", source="registered")
        self.info[name] = info
        self._register(obj, info)
        if info.status == "broken":
            raise PluginError(f"plugin {name!r}: {info.error}")

    def unregister(self, name: str) -> None:
        """Remove a plugin registered by name; unknown names are ignored."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.info.pop(name, None)

    def _register(self, obj: Any, info: PluginInfo) -> None:
        try:
            self.pm.register(obj, name=info.name)
        except Exception as exc:
            self._broken(info, f"invalid hook implementation: {exc}")
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=info.name)
            self._broken(info, f"unknown hook: {exc}")
            return
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(obj) or [])

    def _broken(self, info: PluginInfo, reason: str) -> None:
        info.status = "broken"
        info.error = reason
        log.warning("qo plugin %r not loaded: %s", info.name, reason)

    def schemes(self) -> list[str]:
        """Every URL scheme served by a loaded storage plugin."""
        return sorted({s for lst in self.hook.qo_storage_schemes() for s in (lst or [])})


_lock = threading.Lock()
_default: Plugins | None = None


def get_plugins() -> Plugins:
    """The process's plugin set, loaded from entry points on first use."""
    global _default
    with _lock:
        if _default is None:
            plugins = Plugins(disabled=disabled_from_env())
            plugins.load_entry_points()
            _default = plugins
        return _default


def reset_plugins() -> None:
    """Forget the loaded plugin set, so the next :func:`get_plugins` reloads (tests)."""
    global _default
    with _lock:
        _default = None
