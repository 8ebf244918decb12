"""Configuration: defaults < ``[tool.qo]`` in pyproject.toml < ``qo.toml`` < environment
< command-line flags. ``qo config`` shows every setting, its value and where it came from.

Files are read from the current directory. An unknown key is an error naming the key
and the file (a typo must not be silently ignored). Credentials never belong here; the
URL is shown with its query values and userinfo redacted.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any, Callable

import attrs

from .errors import ConfigurationError
from .urls import redact_url


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    return v


def _names(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = v.replace(",", " ").split()
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a list of plugin names")
    return tuple(x.strip() for x in v if x.strip())


def _positive_int(v: Any) -> int:
    v = int(v) if isinstance(v, str) else v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("must be a positive integer")
    return v


def _positive(v: Any) -> float:
    v = float(v) if isinstance(v, str) else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ValueError("must be a positive, finite number")
    return float(v)


def _log_format(v: Any) -> str:
    if v not in ("text", "json"):
        raise ValueError("must be text or json")
    return v


@attrs.frozen
class Option:
    name: str
    env: str
    default: Any
    parse: Callable[[Any], Any]
    help: str


OPTIONS = {o.name: o for o in [
    Option("url", "QO_URL", "./.qo", _str, "storage URL"),
    Option("queue", "QO_QUEUE", "default", _str, "queue name"),
    Option("disable_plugins", "QO_DISABLE_PLUGINS", (), _names, "plugins not to load"),
    Option("concurrency", "QO_CONCURRENCY", 8, _positive_int, "a worker's slots"),
    Option("poll_max", "QO_POLL_MAX", 5.0, _positive, "longest idle poll interval, seconds"),
    Option("lease_ttl", "QO_LEASE_TTL", 30.0, _positive, "a worker's lease, seconds"),
    Option("shutdown_timeout", "QO_SHUTDOWN_TIMEOUT", 30.0, _positive,
           "on SIGTERM/SIGINT, seconds running tasks get before async handlers are cancelled"),
    Option("storage_failure_limit", "QO_STORAGE_FAILURE_LIMIT", 60.0, _positive,
           "a drain (--until-idle) gives up after storage failed this long, seconds"),
    Option("startup_timeout", "QO_STARTUP_TIMEOUT", None, _positive,
           "a worker started while the store does not answer gives up after this long, seconds "
           "(default: waits for good)"),
    Option("log_format", "QO_LOG_FORMAT", "text", _log_format,
           "what qo worker and qo schedule run log: text, or json (one object per line)"),
]}


@attrs.frozen
class Setting:
    name: str
    value: Any
    source: str  # "default", "pyproject.toml [tool.qo]", "qo.toml", "env QO_...", "--flag"


@attrs.define
class Config:
    settings: dict[str, Setting]

    def __getitem__(self, name: str) -> Any:
        return self.settings[name].value

    def with_flags(self, **flags: Any) -> "Config":
        """Command-line flags win over everything; ``None`` means "not given"."""
        out = dict(self.settings)
        for name, value in flags.items():
            if value is not None:
                out[name] = Setting(name, _parse(OPTIONS[name], value, f"--{name.replace('_', '-')}"), f"--{name.replace('_', '-')}")
        return Config(out)

    def rows(self) -> list[dict[str, Any]]:

        rows = []
        for s in self.settings.values():
            value = redact_url(s.value) if s.name == "url" else s.value
            rows.append({"name": s.name, "value": list(value) if isinstance(value, tuple) else value,
                         "source": s.source})
        return rows


def _parse(option: Option, value: Any, where: str) -> Any:
    try:
        return option.parse(value)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{option.name} (from {where}): {value!r} {exc}") from None


def _table(path: Path, pick: Callable[[dict], Any], label: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{label}: cannot be read: {exc}") from None
    table = pick(data) or {}
    if not isinstance(table, dict):
        raise ConfigurationError(f"{label}: must be a table")
    unknown = sorted(set(table) - set(OPTIONS))
    if unknown:
        raise ConfigurationError(f"{label}: unknown setting {unknown[0]!r} (known: {', '.join(OPTIONS)})")
    return table


def load(cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Every setting with its value and source, from files in ``cwd`` and ``env``."""
    base = Path(cwd or os.getcwd())
    env = os.environ if env is None else env
    layers = [
        ("pyproject.toml [tool.qo]", _table(base / "pyproject.toml", lambda d: d.get("tool", {}).get("qo"),
                                             "pyproject.toml [tool.qo]")),
        ("qo.toml", _table(base / "qo.toml", lambda d: d, "qo.toml")),
    ]
    settings: dict[str, Setting] = {}
    for name, option in OPTIONS.items():
        setting = Setting(name, option.default, "default")
        for label, table in layers:
            if name in table:
                setting = Setting(name, _parse(option, table[name], label), label)
        if env.get(option.env):
            setting = Setting(name, _parse(option, env[option.env], f"env {option.env}"), f"env {option.env}")
        settings[name] = setting
    return Config(settings)
