"""Flash messages: what an action did, said on the page it redirects to.

The URL carries a message id and its values (``?msg=retried&msg_done=3&msg_skipped=1``),
never text: the words come from the table here and each value is checked (counts are
integers, a status one of qo's, a schedule name and a task id as qo spells them), so a
link cannot make the dashboard's banner say anything else. An unknown id or a bad
value shows no banner.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from multidict import MultiMapping

from qo import STATUSES, InvalidInput, check_task_id

PARAM = "msg"
PREFIX = "msg_"
#: qo's schedule name rule (qo/schedule_model.py; not public API, so restated here)
SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}\Z")
COUNT = re.compile(r"^[0-9]{1,9}\Z")
SCHEDULE_ACTIONS = ("pause", "resume", "trigger")


def _count(value: str) -> int | None:
    return int(value) if COUNT.match(value) else None


def _status(value: str) -> str | None:
    return value if value in STATUSES else None


def _schedule(value: str) -> str | None:
    return value if SCHEDULE_NAME.match(value) else None


def _task(value: str) -> str | None:
    try:
        check_task_id(value, "task")
    except InvalidInput:
        return None
    return value


def _action(value: str) -> str | None:
    return value if value in SCHEDULE_ACTIONS else None


#: what each value may be: a checker that returns it parsed, or None when it is not valid
KINDS: dict[str, Callable[[str], Any]] = {
    "done": _count, "skipped": _count, "failed": _count, "n": _count, "status": _status,
    "schedule": _schedule, "task": _task, "action": _action,
}


def _tasks(n: int) -> str:
    return f"{n} task{'s' if n != 1 else ''}"


def _acted(verb: str) -> Callable[[dict[str, Any]], str]:
    def text(v: dict[str, Any]) -> str:
        out = f"{verb} {_tasks(v['done'])}"
        if v.get("skipped"):
            out += f"; {v['skipped']} skipped (not in a state to be {verb}, or changed meanwhile)"
        if v.get("failed"):
            out += f"; {v['failed']} failed (the dashboard's log says why)"
        return out
    return text


def _acted_all(verb: str) -> Callable[[dict[str, Any]], str]:
    return lambda v: f"{verb} {v['n']} {v['status']} task{'s' if v['n'] != 1 else ''}"


#: message id -> (required values, optional values, the text made of them)
MESSAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[dict[str, Any]], str]]] = {
    "retried": (("done",), ("skipped", "failed"), _acted("retried")),
    "cancelled": (("done",), ("skipped", "failed"), _acted("cancelled")),
    "retried-all": (("n", "status"), (), _acted_all("retried")),
    "cancelled-all": (("n", "status"), (), _acted_all("cancelled")),
    "nothing-selected": ((), (), lambda v: "nothing selected"),
    "paused": (("schedule",), (), lambda v: f"paused {v['schedule']}"),
    "resumed": (("schedule",), (), lambda v: f"resumed {v['schedule']}"),
    "triggered": (("schedule", "task"), (), lambda v: f"triggered {v['schedule']}: task {v['task']}"),
    "schedule-missing": (("schedule",), (), lambda v: f"no schedule named {v['schedule']}"),
    "schedule-failed": (("action", "schedule"), (),
                        lambda v: f"could not {v['action']} {v['schedule']} (the dashboard's log says why)"),
}


def query(message: str, **values: Any) -> dict[str, str]:
    """The query parameters that make ``message`` (an id of MESSAGES) with ``values``."""
    required, optional, _ = MESSAGES[message]
    if set(values) - set(required) - set(optional) or set(required) - set(values):
        raise ValueError(f"flash message {message!r} takes {required} and optionally {optional}, not {values}")
    return {PARAM: message, **{PREFIX + k: str(v) for k, v in values.items() if v is not None}}


def text(params: MultiMapping[str]) -> str | None:
    """The banner for a page's query parameters: the table's text, or None (no banner)
    when there is no message, its id is unknown or a value is missing or not valid."""
    ids = params.getall(PARAM, [])
    if len(ids) != 1 or ids[0] not in MESSAGES:
        return None
    required, optional, make = MESSAGES[ids[0]]
    values: dict[str, Any] = {}
    for name in (*required, *optional):
        given = params.getall(PREFIX + name, [])
        if not given:
            if name in required:
                return None
            continue
        value = KINDS[name](given[0]) if len(given) == 1 else None
        if value is None:
            return None
        values[name] = value
    return make(values)


def is_flash_param(name: str) -> bool:
    """Whether a query parameter belongs to a flash message (dropped from links and back=)."""
    return name == PARAM or name.startswith(PREFIX)

