"""Storage URLs as text: their scheme, and a form safe to print (no secrets).

A leaf module (it imports only ``qo.errors``): configuration, plugins and the backends
all use it, so none of them needs another for it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from .errors import InvalidInput

#: "s3//bucket", "s3:/bucket", "s3:bucket": a URL with a typo, not a relative path
_LOOKS_LIKE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(//|:/?)(?!/)")


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
