"""Resolving a URL to a Storage through the ``qo_storage`` hook."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError, InvalidInput
from .plugins import Plugins, get_plugins
from .storage import Storage

DEFAULT_URL = "./.qo"

#: "s3//bucket", "s3:/bucket", "s3:bucket": a URL with a typo, not a relative path
_LOOKS_LIKE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(//|:/?)(?!/)")

#: Where a scheme qo knows of comes from, for the "not installed" hint.
KNOWN_SCHEMES = {
    "s3": "pip install 'qo[s3]'",
    "memory": "pip install qo-memory (plugins/qo-memory)",
    "az": "pip install qo-azure (plugins/qo-azure)",
}


def default_url() -> str:
    """``QO_URL``, else ``url`` from qo.toml / ``[tool.qo]``, else the local default ``./.qo``."""
    from .config import load

    return load()["url"]


def url_scheme(url: str) -> str:
    """The scheme of ``url``; ``""`` for a bare filesystem path."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("url", "must be a non-empty string")
    if "\x00" in url:
        raise InvalidInput("url", "must not contain NUL")
    if "://" not in url:
        if _LOOKS_LIKE_URL.match(url) or url.startswith(":"):
            raise InvalidInput("url", f"{redact_url(url)!r} looks like a malformed URL (expected scheme://...)")
        return ""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise InvalidInput("url", f"malformed URL {redact_url(url)!r}") from None
    if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise InvalidInput("url", f"malformed URL scheme in {redact_url(url)!r}")
    return scheme


def redact_url(url: str) -> str:
    """The URL without userinfo or query values that could hold secrets."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    # only parameter names survive; a bare token (no '=') may itself be a secret
    query = "&".join((p.split("=", 1)[0] if "=" in p else "") + "=..." for p in parts.query.split("&") if p)
    out = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    return out + (f"?{query}" if query else "")


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
