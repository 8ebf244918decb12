"""Aging: due tasks that wait compete at a higher priority, so that nothing starves.

The ready index is ``ready/{255-priority:03d}/{due_ms:013d}-{id}-{type}``: one ascending
LIST yields the most urgent level first and, within a level, the oldest task first.
Aging **re-indexes markers; it never reads or rewrites a task**. An aging pass looks at
the markers below the cap, oldest first in each level, asks the ``qo_effective_priority``
hook what each is worth after waiting ``now - due`` seconds, and moves a marker (PUT the
new key, same due time, id and type; then DELETE the old one; never neither) when:

1. the answer *lands* (:func:`lands`): the cap, or at least ``jump_levels`` (half the way
   to the cap) above the marker's level. With the default policy a marker moves at most
   twice in its life (0 -> 128 at 4 minutes, -> 255 at 8);
2. the new key sorts among the first ``HEAD`` keys of the index, counting the markers
   this pass moved there: only markers workers are about to list move, so on a backlog
   the moves follow the claims, not the backlog's size; a marker left out moves when the
   head has been claimed down to it, with its due time, i.e. to the same place;
3. the pass has budget left: ``MAX_MOVES`` moves and ``MAX_LISTS`` LISTs of ``PAGE``
   keys below the cap, plus the LIST of the head. A pass that runs out returns a cursor;
   the worker's next pass goes on from it.

The claim checks only the due time against the task's ``available_at``, so a moved
marker claims like any other; the task's own ``priority`` never changes, and every
marker written from the task (retry, hand-back, recovery) starts again from it.

Why the default policy raises a *floor* instead of adding to the priority: after the
first move the marker's level is all a pass knows (reading the task to learn its own
priority would cost a GET per move). A rule like ``priority + waited / step`` applied to
an already-moved marker counts the same wait twice. The default rule,
``max(level, min(cap, floor(waited / step_seconds) * step_levels))``, gives the same
answer from the marker's current level as from the task's own priority, however many
passes (on however many workers) applied it before. A plugin replacing the policy must
keep that property (see :func:`effective_priority`).

Cost of one pass: at most ``PASS_REQUESTS_MAX`` = 1 + 32 LIST + 100 PUT + 1
DeleteObjects requests, no GET; about one pass per ``interval`` on a queue, so at most
~804 requests per minute per queue at the defaults whatever the backlog
(:attr:`AgingSettings.max_requests_per_minute`). A queue of fewer than ``PAGE`` ready
markers costs one LIST per pass.

The start bound (default policy, see :meth:`AgingSettings.start_bound`): a due task of
any priority competes at the cap after ``time_to_cap`` (8 minutes at the defaults) and
then runs ahead of all work that became due after it; see docs/architecture.md §5c.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import os
from typing import Any, Mapping

import attrs

from . import keys
from .errors import InvalidInput, PluginError, QoError
from .store import TaskStore

log = logging.getLogger(__name__)

#: markers examined per LIST of a pass (S3 and Azure answer up to 1000 keys per request)
PAGE = 1000
#: a marker is moved only if it lands among the first HEAD keys of the index (a worker
#: lists max(4 x slots, 32): 128 at 32 slots), counting the markers this pass moved there
HEAD = 128
#: LISTs of the scan below the cap in one pass, at most (the head's LIST comes on top)
MAX_LISTS = 32
#: markers moved by one pass at most (the rest wait for the next pass)
MAX_MOVES = 100
#: requests of one pass at most: the head's LIST, the scan's LISTs, one PUT per move and
#: one DeleteObjects (or, on a backend without it, one DELETE per move: see module doc)
PASS_REQUESTS_MAX = 1 + MAX_LISTS + MAX_MOVES + 1
#: concurrent marker PUTs of one pass
PUT_CONCURRENCY = 32

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def _positive_seconds(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"aging.{attribute.name}", f"{value!r} must be a positive number of seconds")


def _level(low: int) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 255:
            raise InvalidInput(f"aging.{attribute.name}", f"{value!r} must be an integer from {low} to 255")
    return check


def _bool(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidInput(f"aging.{attribute.name}", f"{value!r} must be True or False")


@attrs.frozen
class AgingSettings:
    """How a worker ages waiting due tasks (its ``WorkerSettings.aging``).

    With the default policy (``qo.policies.priority``) a due task that has waited ``W``
    seconds competes at ``max(priority, min(cap, floor(W / step_seconds) * step_levels))``.
    At the defaults (60 s, 32 levels, cap 255) every task competes at 255 after 8 minutes
    of waiting, and from then on runs before all work that became due after it.
    ``cap`` below 255 keeps aged work behind fresh work above the cap (so it can starve
    under a flood of such work): the default is 255 on purpose.
    """

    #: False: no aging pass runs; due tasks compete at their own priority forever
    enabled: bool = attrs.field(default=True, validator=_bool)
    #: every ``step_seconds`` of waiting raise the floor by ``step_levels``
    step_seconds: float = attrs.field(default=60.0, validator=_positive_seconds)
    step_levels: int = attrs.field(default=32, validator=_level(1))
    #: aging never raises a task above this level
    cap: int = attrs.field(default=255, validator=_level(0))
    #: a worker runs a pass every ``interval x live workers`` seconds (jittered 0.5x-1.5x),
    #: so the queue sees about one pass per ``interval`` whatever the number of workers
    interval: float = attrs.field(default=10.0, validator=_positive_seconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "AgingSettings":
        """The defaults, overridden by ``QO_AGING`` (on/off), ``QO_AGING_STEP_SECONDS``,
        ``QO_AGING_STEP_LEVELS``, ``QO_AGING_CAP`` and ``QO_AGING_INTERVAL``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        switch = env.get("QO_AGING", "").strip().lower()
        if switch in _OFF:
            values["enabled"] = False
        elif switch and switch not in _ON:
            raise InvalidInput("QO_AGING", f"{switch!r} is neither on nor off")
        for name, field, kind in (("QO_AGING_STEP_SECONDS", "step_seconds", float),
                                  ("QO_AGING_STEP_LEVELS", "step_levels", int),
                                  ("QO_AGING_CAP", "cap", int),
                                  ("QO_AGING_INTERVAL", "interval", float)):
            text = env.get(name, "").strip()
            if not text:
                continue
            try:
                values[field] = kind(text)
            except ValueError:
                raise InvalidInput(name, f"{text!r} is not a {'number' if kind is float else 'whole number'}") from None
        try:
            return cls(**values)
        except InvalidInput as exc:  # name the variable, not the attribute
            field = exc.field.removeprefix("aging.")
            raise InvalidInput(f"QO_AGING_{field.upper()}", exc.message) from None

    @property
    def steps_to_cap(self) -> int:
        """How many raises of the floor it takes to reach the cap (8 at the defaults)."""
        return math.ceil(self.cap / self.step_levels)

    @property
    def jump_levels(self) -> int:
        """A pass moves a marker only to the cap or by at least this many levels: half
        the way to the cap (128 at the defaults), so a marker moves at most twice."""
        return max(1, math.ceil(self.cap / 2))

    @property
    def max_requests_per_minute(self) -> float:
        """Requests aging makes on a queue per minute at most: ``PASS_REQUESTS_MAX`` per
        pass, about one pass per ``interval`` on the queue (804 at the defaults)."""
        return PASS_REQUESTS_MAX * 60.0 / self.interval

    def time_to_cap(self, priority: int = 0) -> float:
        """Seconds of waiting after which a due task of ``priority`` competes at the cap
        (default policy): the same for every priority below the cap."""
        if not self.enabled:
            return math.inf
        return 0.0 if priority >= self.cap else self.steps_to_cap * self.step_seconds

    def pass_gap(self, workers: int = 1) -> float:
        """The longest time between two aging passes on a queue with ``workers`` live
        workers (each runs one every ``interval x workers``, jittered up to 1.5x)."""
        return 1.5 * self.interval * max(1, workers)

    @staticmethod
    def rotation_passes(levels: int = 1, moves: int = 0) -> int:
        """How many passes of one worker it takes to visit every level below the cap, at
        most, when ``levels`` of them hold at least ``PAGE`` markers each (or more than
        ``MAX_LISTS x PAGE`` markers in all) and the rotation moves ``moves`` markers:
        1 while one pass's budget covers the index, at most 8 at 255 full levels."""
        return max(1, math.ceil(levels / MAX_LISTS), math.ceil(moves / MAX_MOVES))

    def start_bound(self, priority: int = 0, *, workers: int = 1, buffer_max_age: float = 2.0,
                    longest_task: float = 0.0, rotation_passes: int = 1) -> float:
        """Seconds after it became due within which a task of ``priority`` starts, once the
        work that became due before it has started (default policy, cap 255).

        = time to reach the cap + the passes it takes one worker to reach the task's
        level (``rotation_passes``, see :meth:`rotation_passes`: 1 while a pass covers
        the index below the cap) x the longest gap between passes + the age of a
        worker's listing (``buffer_max_age``) + the time a busy slot takes to free
        (``longest_task``). Add a few storage round trips (one pass, one LIST, one claim).
        At the defaults, one worker: 480 + 15 + 2 = 497 s plus the longest task; with all
        255 levels below the cap full: 480 + 8 x 15 + 2 = 602 s.
        """
        return (self.time_to_cap(priority) + max(1, rotation_passes) * self.pass_gap(workers)
                + buffer_max_age + longest_task)


def to_aging_settings(value: Any) -> AgingSettings:
    """``WorkerSettings.aging`` accepts AgingSettings, True (from the environment, switched
    on) or False (off)."""
    if isinstance(value, AgingSettings):
        return value
    if value is True:
        return attrs.evolve(AgingSettings.from_env(), enabled=True)
    if value is False:
        return attrs.evolve(AgingSettings.from_env(), enabled=False)
    if value is None:
        return AgingSettings.from_env()
    raise InvalidInput("aging", f"{value!r} must be an AgingSettings, True or False")


@attrs.frozen
class ReadyEntry:
    """What ``qo_effective_priority`` is asked about: a due task as the ready index sees it.

    ``priority`` is the level the task competes at now: its ready marker's level, which an
    earlier pass may already have raised (or the task's own priority when it is computed
    from the task, as ``qo status`` does). ``aging`` carries the settings of the worker
    asking, so a policy can be configured per queue.
    """

    priority: int
    due: float
    task_id: str
    task_type: str
    aging: AgingSettings

    @property
    def id(self) -> str:
        return self.task_id

    @classmethod
    def of_marker(cls, marker: keys.Marker, aging: AgingSettings) -> "ReadyEntry":
        return cls(marker.priority, marker.due, marker.task_id, marker.task_type, aging)


def effective_priority(plugins: Any, entry: ReadyEntry, waited_s: float) -> int:
    """The level ``entry`` competes at after waiting ``waited_s`` seconds: never below its
    current level; its own level when aging is off or no plugin answers.

    A policy must be monotone in ``waited_s`` (a pass stops at the first marker of a level
    that does not move: younger ones would not either) and must give the same answer
    from an already-raised level as from the task's own priority (the pass sees only the
    marker). A policy answering anything but an integer 0-255 raises ``PluginError``.
    """
    if not entry.aging.enabled:
        return entry.priority
    result = plugins.hook.qo_effective_priority(task=entry, waited_s=max(0.0, float(waited_s)))
    if result is None:
        return entry.priority
    if isinstance(result, bool) or not isinstance(result, int) or not 0 <= result <= 255:
        raise PluginError(f"qo_effective_priority returned {result!r} for task {entry.task_id}; "
                          "expected an integer from 0 to 255")
    return max(entry.priority, result)


def task_effective_priority(plugins: Any, task: Any, now: float, aging: AgingSettings | None = None) -> int:
    """The priority a stored task competes at now, computed from the task (no request):
    its own priority unless it is pending and due, then what the policy gives for
    ``now - available_at``. Its ready marker catches up at the next aging pass."""
    aging = AgingSettings.from_env() if aging is None else aging
    if task.status != "pending" or task.available_at > now:
        return task.priority
    entry = ReadyEntry(task.priority, task.available_at, task.id, task.task_type, aging)
    return effective_priority(plugins, entry, now - task.available_at)


@attrs.frozen
class AgingPass:
    """What one pass did: markers ``moved``, ``lists`` requested, markers ``examined``,
    whether it stopped at its move budget with more to move (``more``), and where the
    next pass of this worker resumes (``cursor``; None: at the top, just below the cap)."""

    moved: int
    lists: int
    examined: int
    more: bool
    cursor: str | None = None


def level_end(prefix: str, priority: int) -> str:
    """A ``start_after`` that skips every key of level ``priority`` (and all above it):
    ``~`` sorts after the digits that start every marker name."""
    return f"{prefix}{255 - priority:03d}/~"


def lands(level: int, target: int, aging: AgingSettings) -> bool:
    """Whether a marker at ``level`` worth ``target`` is moved: only to the cap (or
    above), or by at least ``aging.jump_levels`` (half the way to the cap). Monotone in
    ``target``, and a marker lands at most twice in its life with the default policy."""
    return target > level and (target >= aging.cap or target - level >= aging.jump_levels)


async def age_ready(store: TaskStore, plugins: Any, aging: AgingSettings, now: float, *,
                    cursor: str | None = None, page: int = PAGE, head: int = HEAD,
                    max_lists: int = MAX_LISTS, max_moves: int = MAX_MOVES) -> AgingPass:
    """One aging pass over the ready index of ``store``'s queue (see the module docstring).

    LIST the head of the index (``page`` keys): a marker is moved only if its new key
    sorts among the first ``head`` keys, counting the markers moved there by this pass
    (it would be listed by a worker soon); a listing that is the whole index is the
    whole scan. Otherwise scan the levels below the cap from
    ``cursor`` (where this worker's previous pass stopped), ``page`` keys per LIST, at
    most ``max_lists`` LISTs and ``max_moves`` moves; within a level, stop at the first
    marker that does not move (younger ones would not either) and jump to the next
    level with ``start_after``. The moved markers are written first, then the old ones
    deleted in one batch: a crash in between leaves both (the extra one is stale once
    the task is claimed, and is dropped by the stale-marker rule), never neither.
    """
    if not aging.enabled or aging.cap <= 0:
        return AgingPass(0, 0, 0, False)
    prefix = keys.ready_prefix(store.queue)
    top = level_end(prefix, aging.cap)  # levels at or above the cap never move
    listed = await store.list(prefix, limit=page)
    lists = 1
    whole = len(listed) < page  # the listing is the whole index: nothing else to list
    window = [e.key for e in listed[:head]]  # the index head, as moves change it
    pos = top if whole or cursor is None or cursor < top else cursor
    moves: list[tuple[str, str]] = []  # (old key, new key)
    examined = 0
    more = False
    next_cursor: str | None = None
    while True:
        if whole:
            entries = [e for e in listed if e.key > pos]
        else:
            if lists >= 1 + max_lists:
                next_cursor = pos  # out of LISTs: the next pass goes on from here
                break
            entries = await store.list(prefix, start_after=pos, limit=page)
            lists += 1
        if not entries:
            break
        stopped: int | None = None  # the level whose aging stopped in this page
        for entry in entries:
            m = keys.parse_marker(entry.key)
            if m is None or m.kind != "ready" or m.priority == stopped:
                continue
            examined += 1
            target = effective_priority(plugins, ReadyEntry.of_marker(m, aging), now - m.due)
            new = keys.ready(store.queue, target, m.due, m.task_id, m.task_type)
            if lands(m.priority, target, aging) and (len(window) < head or new < window[-1]):
                moves.append((m.key, new))
                if m.key in window:
                    window.remove(m.key)
                bisect.insort(window, new)
                del window[head:]
                if len(moves) >= max_moves:
                    more, next_cursor = True, m.key
                    break
            else:
                stopped = m.priority  # ascending due time: the rest of this level is younger
        if more or whole or len(entries) < page:
            break
        last = keys.parse_marker(entries[-1].key)
        if last is not None and last.priority == stopped:
            if stopped == 0:
                break  # the lowest level: nothing sorts after it
            pos = level_end(prefix, stopped)
        else:
            pos = entries[-1].key
    await _apply(store, moves)
    return AgingPass(len(moves), lists, examined, more, next_cursor)


async def _apply(store: TaskStore, moves: list[tuple[str, str]]) -> None:
    """Write every new marker, then delete the old markers whose new one was written."""
    if not moves:
        return
    gate = asyncio.Semaphore(PUT_CONCURRENCY)

    async def put(key: str) -> None:
        async with gate:
            await store.put_marker(key)

    results = await asyncio.gather(*(put(new) for _, new in moves), return_exceptions=True)
    await store.delete_markers([old for (old, _), r in zip(moves, results) if r is None])
    errors = [r for r in results if r is not None]
    for r in errors:
        if not isinstance(r, QoError):
            raise r
    if errors:
        log.warning("aging: %d of %d marker moves failed; they are retried by the next pass",
                    len(errors), len(moves))
        raise errors[0]
