"""How one S3-compatible store speaks S3's conditional requests: learned by a probe, or declared.

S3 servers differ where qo's safety lives (issue 27):

- ``if_match``: AWS compares ``If-Match`` with the etag *as it returned it*, quoted
  (``"c4ca..."``); Ceph RGW 16 compares without the quotes and refuses the quoted form
  with 412. ``quoted`` or ``unquoted``.
- ``delete``: ``DELETE`` with ``If-Match`` is ``honoured`` (AWS, moto), ``ignored`` (RGW
  16: a wrong etag deletes anyway) or ``refused`` (LocalStack 4: 501 NotImplemented).
  qo's correctness never rests on it; the storage declares ``conditional_delete``.
- ``start_after``: ``ListObjectsV2``'s ``StartAfter`` with non-ASCII characters is
  compared ``exact`` (by UTF-8 bytes, as AWS does) or only right for ``ascii``
  (LocalStack 4 compares percent-encoded keys); in the latter case the backend sends
  the ASCII beginning of ``start_after`` and drops the rest on its side.

A store that cannot be safe (create-only overwrote; a CAS on a stale etag succeeded;
a CAS on the current etag refused in both forms) is refused when first used, unless
the URL says ``unsafe=1``.

In a URL: ``?dialect=probe`` (the default: learn it, once per bucket prefix, kept in
``_qo/dialect.json``), a preset (``aws``, ``rgw``, ``localstack``), or the settings one by
one, ``,``-separated: ``?dialect=if_match:unquoted,delete:ignored,start_after:exact``
(unnamed settings are AWS's). A declared dialect is trusted as is: nothing is probed.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from qo.errors import ConfigurationError, InvalidInput

__all__ = ["Dialect", "UnsafeStore", "PRESETS", "parse_dialect", "DIALECT_KEY", "VERSION"]

DIALECT_KEY = "_qo/dialect.json"  #: where the learned dialect is kept, under the URL's prefix
RESERVED = "_qo/"  #: the backend's own keys: never listed to the engine
VERSION = 1  #: of the probe: a dialect.json of another version is probed again

_CHOICES = {
    "if_match": ("quoted", "unquoted"),
    "delete": ("honoured", "ignored", "refused"),
    "start_after": ("exact", "ascii"),
}


class UnsafeStore(ConfigurationError):
    """The store's answers show that conditional writes are not enforced: qo would lose tasks."""


@attrs.frozen
class Dialect:
    """What a store does with conditional requests (see the module's doc)."""

    if_match: str = "quoted"
    delete: str = "honoured"
    start_after: str = "exact"
    source: str = "declared"  #: ``declared`` (URL), ``probed`` (just now) or ``stored`` (dialect.json)

    def __attrs_post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InvalidInput("url", f"dialect {name} must be one of {', '.join(allowed)}")

    @property
    def conditional_delete(self) -> bool:
        """True when ``delete(if_match=)`` is honoured by the store."""
        return self.delete == "honoured"

    def if_match_value(self, etag: str) -> str:
        """The ``If-Match`` header value for ``etag`` (as the store returned it)."""
        return etag if self.if_match == "quoted" else etag.strip('"')

    def spelled(self) -> str:
        """The ``?dialect=`` value that declares this dialect."""
        return ",".join(f"{name}:{getattr(self, name)}" for name in _CHOICES)

    def to_json(self) -> bytes:
        return json.dumps({"version": VERSION, **{n: getattr(self, n) for n in _CHOICES}}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Dialect | None:
        """The dialect kept in ``data``; ``None`` when it is not a readable one of this version."""
        try:
            raw: Any = json.loads(data)
            if not isinstance(raw, dict) or raw.get("version") != VERSION:
                return None
            return cls(**{n: raw[n] for n in _CHOICES}, source="stored")
        except (ValueError, KeyError, TypeError, InvalidInput):
            return None


PRESETS = {
    "aws": Dialect(),
    "rgw": Dialect(if_match="unquoted", delete="ignored"),
    "localstack": Dialect(delete="refused", start_after="ascii"),
}


def parse_dialect(value: str | None) -> Dialect | None:
    """The dialect a URL declares (``None``: probe it); raise InvalidInput naming the field."""
    if value is None or value in ("", "probe"):
        return None
    if value in PRESETS:
        return PRESETS[value]
    settings: dict[str, str] = {}
    for part in value.split(","):
        name, sep, choice = part.partition(":")
        if not sep or name not in _CHOICES:
            raise InvalidInput("url", f"dialect must be probe, {', '.join(PRESETS)} or name:value pairs "
                                      f"of {', '.join(_CHOICES)} (got {part[:40]!r})")
        settings[name] = choice
    return Dialect(**settings)
