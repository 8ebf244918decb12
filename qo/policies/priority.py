"""Default priority policy: the longer a due task waits, the higher the floor it competes at.

    effective = max(level, min(cap, floor(waited_s / step_seconds) * step_levels))

``level`` is the priority the task competes at now (its ready marker's level: the task's
own priority, or a level an earlier aging pass raised it to) and ``waited_s`` counts from
the moment it became due. The settings come from the asking worker
(``task.aging``, a :class:`qo.aging.AgingSettings`); without them (a caller passing a plain
task), from the environment (``QO_AGING*``).

Why a rising floor rather than ``priority + waited / step``: the aging pass sees only the
marker, whose level may already include earlier aging. The floor gives the same answer
from any earlier result as from the task's own priority (``f(f(p, w1), w2) == f(p, w2)``
for ``w1 <= w2``), so passes may run any number of times, on any number of workers.
Fresh work keeps strict priority order; a task that has waited ``k`` steps competes at
least at ``k * step_levels``; after ``ceil(cap / step_levels)`` steps (8 minutes at the
defaults) every task competes at the cap and runs FIFO among cap-level work, i.e. before
all work that became due after it.
"""

from __future__ import annotations

import math
from typing import Any

from qo.hookspecs import hookimpl


def aged_priority(level: int, waited_s: float, step_seconds: float, step_levels: int, cap: int) -> int:
    """``max(level, min(cap, floor(waited_s / step_seconds) * step_levels))``."""
    if waited_s <= 0:
        return level
    steps = math.floor(waited_s / step_seconds)
    return max(level, min(cap, steps * step_levels))


@hookimpl
def qo_effective_priority(task: Any, waited_s: float) -> int | None:
    from qo.aging import AgingSettings

    settings = getattr(task, "aging", None)
    if not isinstance(settings, AgingSettings):
        settings = AgingSettings.from_env()
    level = int(task.priority)
    if not settings.enabled:
        return level
    return aged_priority(level, waited_s, settings.step_seconds, settings.step_levels, settings.cap)
