"""Loading plugins: the ``qo`` entry-point group, blocking by name, direct registration.

Loading is a memoised factory (:func:`get_plugins`) called by the app, never an import
side effect. A plugin that fails to load in any way (its import raises anything,
``sys.exit()`` and ``KeyboardInterrupt`` included, or it implements a hook wrongly) is
reported with its name, distribution and the reason, and left out; it does not take qo
down. The built-ins keep their names: another distribution's entry point named like
one is reported and skipped. ``QO_STRICT_PLUGINS=1`` makes each of these fatal.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import attrs
import pluggy

from . import hookspecs
from .errors import ConfigurationError, PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qo"
#: Built-ins the engine cannot work without; configuration cannot block these.
ESSENTIAL = frozenset({"retry", "cron"})
#: The distribution whose entry points are the built-ins.
QO_DISTRIBUTION = "qo-queue"
#: qo's own entry points (pyproject.toml): no other distribution may take these names.
BUILTINS = frozenset({"local", "s3", "retry", "priority", "cron", "ratelimit"})
#: Load failures of a plugin's import: anything it raises, exits included.
_LOAD_ERRORS = (Exception, SystemExit, KeyboardInterrupt)


@attrs.define
class PluginInfo:
    """What ``qo plugins`` shows about one plugin."""

    name: str
    status: str  # "loaded" | "blocked" | "broken" (failed to load) | "skipped" (name clash)
    distribution: str | None = None
    version: str | None = None
    source: str | None = None  # entry-point value or "registered"
    hooks: list[str] = attrs.field(factory=list)
    error: str | None = None


def strict_from_env(value: str | None = None) -> bool:
    """Whether a plugin that cannot be loaded is fatal: ``value``, else ``QO_STRICT_PLUGINS``."""
    if value is None:
        value = os.environ.get("QO_STRICT_PLUGINS", "")
    flag = value.strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("", "0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"QO_STRICT_PLUGINS: {value[:40]!r} is not one of 1, 0, true, false, yes, no")


def disabled_from_env(value: str | None = None) -> frozenset[str]:
    """Plugins not to load: ``value``, else ``QO_DISABLE_PLUGINS`` (comma or space
    separated), else ``disable_plugins`` from qo.toml / ``[tool.qo]``."""
    if value is None:
        from .config import load

        return frozenset(load()["disable_plugins"])
    return frozenset(n.strip() for n in value.replace(",", " ").split() if n.strip())


class Plugins:
    """A pluggy manager with qo's hook specification and a record of what was loaded."""

    def __init__(self, disabled: Iterable[str] = (), *, strict: bool = False):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.disabled = frozenset(disabled)
        self.strict = strict
        self.info: dict[str, PluginInfo] = {}
        #: entry points left out because their name was taken (shown by ``qo plugins``)
        self.skipped: list[PluginInfo] = []

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def all_info(self) -> list[PluginInfo]:
        """Every plugin record, the skipped entry points included, by name."""
        return sorted([*self.info.values(), *self.skipped], key=lambda i: (i.name, i.status == "skipped"))

    def load_entry_points(self) -> None:
        """Register every plugin of the ``qo`` entry-point group not blocked by name.

        qo's own entry points come first under each name, so a built-in cannot be
        replaced by another distribution's entry point of the same name.
        """
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: (e.name, not _is_builtin(e))):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                status="loaded",
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
                source=ep.value,
            )
            taken = self.info.get(ep.name)
            if taken is not None:
                if taken.distribution == info.distribution and taken.source == info.source:
                    continue  # loaded by an earlier call
                self._clash(info, taken)
                continue
            if ep.name in BUILTINS and not _is_builtin(ep):  # qo's own is not installed
                self._clash(info, PluginInfo(name=ep.name, status="loaded", distribution=QO_DISTRIBUTION))
                continue
            self.info[ep.name] = info
            if ep.name in self.disabled and ep.name not in ESSENTIAL:
                info.status = "blocked"
                continue
            try:
                with _real_sigint() as interrupted:
                    obj = ep.load()
            except _LOAD_ERRORS as exc:  # a broken plugin must not take qo down
                if interrupted:  # the user's own Ctrl-C, not the plugin's: stop
                    raise
                self._broken(info, f"import failed: {_describe(exc)}")
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
            with _real_sigint() as interrupted:
                self.pm.register(obj, name=info.name)
        except _LOAD_ERRORS as exc:
            self._drop(info.name)
            if interrupted:
                raise  # pluggy keeps the hooks it added before the bad one
            self._broken(info, f"invalid hook implementation: {_describe(exc)}")
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._drop(info.name)
            self._broken(info, f"unknown hook: {exc}")
            return
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(obj) or [])

    def _drop(self, name: str) -> None:
        """Unregister what pluggy registered of a plugin that failed half-way."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)

    def _clash(self, info: PluginInfo, taken: PluginInfo) -> None:
        """Skip an entry point whose name an earlier plugin (a built-in first) holds."""
        builtin = _normalize(taken.distribution) == QO_DISTRIBUTION and taken.name in BUILTINS
        owner = "qo's built-in" if builtin else "plugin"
        where = f"distribution {taken.distribution!r}" if taken.distribution else "registered directly"
        info.status = "skipped"
        info.error = (
            f"plugin name {info.name!r} of distribution {_dist_label(info)!r} clashes with {owner} "
            f"{taken.name!r} ({where}); rename its entry point"
        )
        if info in self.skipped:  # reported by an earlier call
            return
        self.skipped.append(info)
        self._report(info)

    def _broken(self, info: PluginInfo, reason: str) -> None:
        info.status = "broken"
        info.error = reason
        self._report(info)

    def _report(self, info: PluginInfo) -> None:
        """One line naming the plugin, its distribution and why it is out; fatal if strict."""
        origin = "registered directly" if info.source == "registered" else f"distribution {_dist_label(info)!r}"
        line = f"qo plugin {info.name!r} ({origin}) not loaded: {info.error}"
        if self.strict:
            raise PluginError(f"{line} (QO_STRICT_PLUGINS=1)")
        log.warning("%s", line)

    def schemes(self) -> list[str]:
        """Every URL scheme served by a loaded storage plugin."""
        return sorted({s for lst in self.hook.qo_storage_schemes() for s in (lst or [])})


def _is_builtin(ep: Any) -> bool:
    """Whether an entry point is one of qo's own."""
    dist = getattr(ep, "dist", None)
    return ep.name in BUILTINS and dist is not None and _normalize(dist.name) == QO_DISTRIBUTION


def _normalize(name: str | None) -> str:
    """A distribution name as the package index compares them."""
    return "-".join((name or "").lower().replace("_", "-").replace(".", "-").split("-"))


def _dist_label(info: PluginInfo) -> str:
    """The distribution of a plugin, for messages."""
    return info.distribution or "<unknown>"


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line, cut to a readable length."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


@contextmanager
def _real_sigint() -> Iterator[list[int]]:
    """Tell the user's Ctrl-C during a plugin's import from a ``KeyboardInterrupt``
    the plugin raises itself: the yielded list is non-empty after a real SIGINT.

    Only in the main thread with Python's default handler; elsewhere it notices nothing.
    """
    seen: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield seen
        return

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        if signal.getsignal(signal.SIGINT) is handler:  # the plugin may have set its own
            signal.signal(signal.SIGINT, signal.default_int_handler)


_lock = threading.Lock()
_default: Plugins | None = None


def get_plugins() -> Plugins:
    """The process's plugin set, loaded from entry points on first use."""
    global _default
    with _lock:
        if _default is None:
            plugins = Plugins(disabled=disabled_from_env(), strict=strict_from_env())
            plugins.load_entry_points()
            _default = plugins
        return _default


def reset_plugins() -> None:
    """Forget the loaded plugin set, so the next :func:`get_plugins` reloads (tests)."""
    global _default
    with _lock:
        _default = None
