"""UTF-8 key order on a listing service whose own order may be UTF-16's.

The qo contract lists keys in the order of their UTF-8 bytes (code point order). Azure
documents "alphabetical order"; Azurite, the emulator, sorts (and applies ``startFrom``)
by JavaScript string comparison, i.e. by UTF-16 code units. The two orders agree on
every pair of names except where, at the first difference, one name has a character in
U+E000..U+FFFF and the other a supplementary one (U+10000 and up, a surrogate pair in
UTF-16): UTF-8 puts the supplementary character last, UTF-16 first.

Listing is exact under either order with two corrections, both free unless such
characters occur in the keys:

- **Where to start** (:func:`start_from`): ``startFrom`` at ``start_after`` could skip a
  key that is greater in UTF-8 but smaller in UTF-16. Such a key shares ``start_after``
  up to its first character >= U+E000, so the listing starts there instead and the keys
  up to ``start_after`` are dropped on this side.
- **When to stop** (:func:`complete`): a key not yet listed (later in the server's
  order) can precede a listed one in UTF-8 order only if the listed one has a
  supplementary character where they differ. So once the ``limit`` smallest keys seen
  contain no supplementary character, or the listing has moved past every name sharing
  the last one's beginning up to its first supplementary character, they are final.
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["utf8_key", "start_from", "complete", "smallest"]

_HIGH_BMP = "\ue000"  # U+E000: the first character whose UTF-16 and UTF-8 ranks can differ
_SUPPLEMENTARY = "\U00010000"


def utf8_key(key: str) -> bytes:
    """The sort key of the contract: a name's UTF-8 bytes."""
    return key.encode("utf-8")


def start_from(start_after: str) -> str:
    """The ``startFrom`` (inclusive) that misses no key after ``start_after`` in UTF-8
    order, on a server ordering by UTF-8 or by UTF-16."""
    for i, ch in enumerate(start_after):
        if ch >= _HIGH_BMP:
            return start_after[:i]
    return start_after


def _first_supplementary(key: str) -> int | None:
    for i, ch in enumerate(key):
        if ch >= _SUPPLEMENTARY:
            return i
    return None


def smallest(keys: Iterable[str], limit: int) -> list[str]:
    """The ``limit`` smallest keys in UTF-8 order."""
    return sorted(keys, key=utf8_key)[:limit]


def complete(chosen: list[str], limit: int, last_listed: str | None, exhausted: bool) -> bool:
    """Whether ``chosen`` (the ``limit`` UTF-8-smallest keys seen so far, sorted) is final.

    ``last_listed`` is the last name the server returned (in its own order) and
    ``exhausted`` says the server has no more.
    """
    if exhausted:
        return True
    if len(chosen) < limit:
        return False
    boundary = chosen[-1]
    i = _first_supplementary(boundary)
    if i is None:
        return True  # nothing listed later can sort before a name without such characters
    # The names sharing ``stem`` are contiguous in either order and ``boundary`` (one of
    # them) was listed: once the server lists a name outside them, none is left.
    return last_listed is not None and not last_listed.startswith(boundary[:i])
