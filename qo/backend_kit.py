"""Helpers for writing a storage backend over an HTTP service (used by qo_s3 and
plugins/qo-azure; part of the public plugin API):

- :class:`ServerClock`: the server clock's offset from the local one, from ``Date``
  headers, so leases and due times of every machine agree with the store's clock;
- :class:`SecretScrubber`: a logging filter that replaces known credentials with
  ``***`` in the records of an SDK's loggers, and :func:`scrub` for error texts;
- :func:`split_bucket_url`: ``scheme://bucket/prefix?query`` checked the same way for
  every such backend.
"""

from __future__ import annotations

import logging
from email.utils import parsedate_to_datetime
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import InvalidInput
from .storage import validate_key

__all__ = ["ServerClock", "SecretScrubber", "scrub", "split_bucket_url", "MAX_DRIFT"]

#: clocks drift apart by at most ~100 ppm: the offset bounds widen by that over time
MAX_DRIFT = 1e-4


class ServerClock:
    """Server-minus-local clock offset in seconds (``offset``), refined per response.

    The ``Date`` header has 1-second resolution, so one response sent at ``t0`` and
    received at ``t1`` with ``Date: D`` bounds the offset to ``D - t1 <= offset < D + 1
    - t0``. The estimate keeps the intersection of these intervals (widened by
    ``MAX_DRIFT`` of the elapsed time) and reports its midpoint; an interval that
    contradicts it (the server clock jumped, or another front end answered) restarts it.
    Within ``latency/2 + 0.5 s`` after one response it tightens to about the round-trip
    time, and one slow response cannot pull it off.
    """

    def __init__(self) -> None:
        self.offset: float = 0.0
        self.bounds: tuple[float, float, float] | None = None  # (low, high, local time)

    def observe(self, date_header: str | None, t0: float, t1: float) -> None:
        """Tighten the estimate with a response's ``Date`` header (ignored if absent or bad)."""
        if not date_header:
            return
        try:
            server = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        low, high = server - t1, server + 1.0 - t0
        if self.bounds is not None:
            old_low, old_high, at = self.bounds
            slack = MAX_DRIFT * max(0.0, t1 - at)
            low, high = max(low, old_low - slack), min(high, old_high + slack)
            if low > high:  # contradiction: the server clock moved; start over
                low, high = server - t1, server + 1.0 - t0
        self.bounds = (low, high, t1)
        self.offset = (low + high) / 2


def scrub(text: str, secrets: Iterable[str], limit: int | None = 300) -> str:
    """``text`` with every secret (of at least 4 characters) replaced by ``***``, cut to
    ``limit`` characters."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text[:limit]


class SecretScrubber(logging.Filter):
    """Replaces every remembered credential with ``***`` in the log records of the
    loggers it is installed on (SDKs log whole requests at DEBUG: headers, signatures,
    tokens). One per backend module: ``SCRUBBER = SecretScrubber().install([...])``."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def install(self, logger_names: Iterable[str]) -> "SecretScrubber":
        for name in logger_names:
            logging.getLogger(name).addFilter(self)
        return self

    def remember(self, secrets: Iterable[str]) -> None:
        """Scrub these from now on (strings shorter than 4 characters are ignored)."""
        self.secrets.update(s for s in secrets if s and len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record is not ours to fix
                return True
            if any(s in message for s in self.secrets):
                record.msg, record.args = scrub(message, self.secrets, limit=None), ()
        return True


def split_bucket_url(url: str, scheme: str, *, query: Mapping[str, str],
                     credentials_hint: str) -> tuple[str, str, dict[str, str]]:
    """``scheme://bucket/prefix?query`` -> (bucket, prefix, settings), refusing what no
    such URL may hold: another scheme, credentials (``user@``; ``credentials_hint`` says
    where they go instead), a #fragment, a prefix that is not a valid key, a query name
    not in ``query`` (which maps each accepted spelling to its setting). The bucket
    name's own rules are the backend's to check."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidInput("url", f"malformed {scheme}:// URL") from None
    if parts.scheme.lower() != scheme:
        raise InvalidInput("url", f"not an {scheme}:// URL")
    if "@" in parts.netloc:
        raise InvalidInput("url", f"credentials do not belong in the URL: {credentials_hint}")
    if parts.fragment:
        raise InvalidInput("url", f"an {scheme}:// URL has no #fragment")
    prefix = unquote(parts.path).strip("/")
    if prefix:
        validate_key(prefix, field="url")
    settings: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidInput("url", "malformed query string") from None
    for name, value in pairs:
        if name not in query:
            raise InvalidInput("url", f"unknown query parameter {name[:40]!r} (known: {', '.join(sorted(query))})")
        settings[query[name]] = value
    return parts.netloc, prefix, settings
