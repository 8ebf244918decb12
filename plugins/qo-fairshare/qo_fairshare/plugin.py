"""The fair-share priority policy (entry point ``fairshare`` in the ``qo`` group).

Off unless ``QO_FAIRSHARE=on``: then the hook answers **only** for the task types listed
in ``QO_FAIRSHARE_TYPES`` (comma or space separated) and returns ``None`` for every
other type, so the built-in default policy keeps deciding for them. A listed type ages
``QO_FAIRSHARE_BOOST`` times faster (default 4): a flood of one busy type cannot keep
a favoured type's waiting tasks behind it for the default's full time to the cap.

The rule is the default's rising floor with a shorter step,

    effective = max(level, min(cap, floor(waited_s * boost / step_seconds) * step_levels))

so it keeps the two properties ``qo.aging`` requires of a policy: monotone in
``waited_s``, and the same answer from an already-raised level as from the task's own
priority. ``step_seconds``, ``step_levels`` and ``cap`` come from the asking worker's
aging settings (``task.aging``), else qo's defaults (60 s, 32 levels, 255).

The settings are read from the environment at every call, so switching is immediate.
An invalid setting stops a worker at start-up (``qo_worker_started`` raises the
``InvalidInput`` naming the variable); where the hook is asked without a worker (``qo
status``) it has no opinion then, and says so once.
The hookimpl is ``tryfirst``: entry points load in name order, and ``fairshare`` sorts
before qo's built-in ``priority``, which would otherwise be asked first and answer.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import qo

_ON = ("1", "on", "true", "yes")
_OFF = ("", "0", "off", "false", "no")

log = logging.getLogger(__name__)
_warned: set[str] = set()

DEFAULT_STEP_SECONDS = 60.0
DEFAULT_STEP_LEVELS = 32
DEFAULT_CAP = 255


@dataclass(frozen=True)
class FairShareSettings:
    """``QO_FAIRSHARE`` (on/off), ``QO_FAIRSHARE_TYPES``, ``QO_FAIRSHARE_BOOST``."""

    enabled: bool = False
    types: frozenset[str] = frozenset()
    boost: float = 4.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "FairShareSettings":
        env = os.environ if environ is None else environ
        switch = env.get("QO_FAIRSHARE", "").strip().lower()
        if switch not in _ON + _OFF:
            raise qo.InvalidInput("QO_FAIRSHARE", f"{switch!r} is neither on nor off")
        types = frozenset(t for t in env.get("QO_FAIRSHARE_TYPES", "").replace(",", " ").split() if t)
        text = env.get("QO_FAIRSHARE_BOOST", "").strip()
        try:
            boost = float(text) if text else 4.0
        except ValueError:
            raise qo.InvalidInput("QO_FAIRSHARE_BOOST", f"{text!r} is not a number") from None
        if not math.isfinite(boost) or boost < 1:
            raise qo.InvalidInput("QO_FAIRSHARE_BOOST", f"{text!r} must be a number >= 1")
        return cls(enabled=switch in _ON, types=types, boost=boost)


def fair_priority(level: int, waited_s: float, boost: float, step_seconds: float, step_levels: int, cap: int) -> int:
    """``max(level, min(cap, floor(waited_s * boost / step_seconds) * step_levels))``."""
    if waited_s <= 0:
        return level
    steps = math.floor(waited_s * boost / step_seconds)
    return max(level, min(cap, steps * step_levels))


@qo.hookimpl
def qo_worker_started(worker: Any) -> None:
    """Check the settings once, at start-up: an invalid one stops the worker there."""
    FairShareSettings.from_env()


@qo.hookimpl(tryfirst=True)
def qo_effective_priority(task: Any, waited_s: float) -> int | None:
    try:
        settings = FairShareSettings.from_env()
    except qo.InvalidInput as exc:  # a worker refused to start on it; elsewhere: no opinion
        if str(exc) not in _warned:
            _warned.add(str(exc))
            log.error("qo-fairshare is off: %s", exc)
        return None
    if not settings.enabled or getattr(task, "task_type", None) not in settings.types:
        return None  # no opinion: the default policy (or the next plugin) decides
    aging = getattr(task, "aging", None)
    if aging is not None and not getattr(aging, "enabled", True):
        return int(task.priority)
    return fair_priority(
        int(task.priority),
        waited_s,
        settings.boost,
        getattr(aging, "step_seconds", DEFAULT_STEP_SECONDS),
        getattr(aging, "step_levels", DEFAULT_STEP_LEVELS),
        getattr(aging, "cap", DEFAULT_CAP),
    )
