"""Every object key qo writes, in one place.

All keys live under ``{queue}/``. Markers are projections of the task (the single
source of truth) and carry in their names what a worker needs to choose work without
reading the task: priority, due time, id and task type.

    {q}/tasks/{id}.json                                the task
    {q}/packs/{pack_id}.json                           up to 256 tasks submitted in bulk (qo/packs.py)
    {q}/ready/{255-priority:03d}/{due_ms:013d}-{id}-{type}    due: ascending LIST = most urgent first
    {q}/delayed/{due_ms:013d}-{255-priority:03d}-{id}-{type}  not due yet: ascending = soonest first
    {q}/workers/{worker_id}.json                       heartbeat + in-flight leases
    {q}/settings.json                                  shared settings, and the key layout
    {q}/idem/{namespace}/{sha256(key)}.json            idempotency record
    {q}/idem-exp/{expires_ms:013d}-{namespace~sha256}  its expiry marker: the sweep lists these
    {q}/deps/{parent_id}/{child_id}-{child_type}       dependency edge: whom to wake
    {q}/ended/{status}/{inverted_ms:013d}-{id}-{type}  failed/cancelled/skipped/expired, newest first
    {q}/payloads/{id}/input.json                       an input stored apart (over 64 KiB)
    {q}/payloads/{id}/output-{attempt}-{lease}.json    an attempt's output stored apart
"""

from __future__ import annotations

import os
import re
import threading
import time

import attrs

TASK_ID = re.compile(r"^[0-9a-f]{24}\Z")
#: a pack's id: a task id's first 21 characters, the 13th 8-f (qo/packs.py)
PACK_ID = re.compile(r"^[0-9a-f]{12}[89a-f][0-9a-f]{8}\Z")
TASK_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,127}\Z")
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")


_id_lock = threading.Lock()
_id_last = [0, 0]  # last millisecond, sequence within it


def new_task_id() -> str:
    """24 hex chars: 12 of milliseconds, 4 of a per-process sequence, 8 random.

    Ids of one process sort in submission order; ``tasks/`` lists oldest first.
    """
    ms_now = int(time.time() * 1000)
    with _id_lock:
        last, seq = _id_last
        if ms_now <= last:
            ms_now, seq = last, seq + 1
            if seq > 0x7FFF:  # the top bit marks the ids of packed tasks (new_pack_id)
                ms_now, seq = last + 1, 0
        else:
            seq = 0
        _id_last[:] = [ms_now, seq]
    return f"{ms_now:012x}{seq:04x}{os.urandom(4).hex()}"


_pack_last = [0, 0]  # last millisecond, pack sequence within it


def new_pack_id(count: int) -> str:
    """21 hex chars for a pack of ``count`` tasks (1-4096): 12 of milliseconds, 1 of a
    per-process sequence of packs with its top bit set (no single task's id has it), 3
    of ``count - 1`` (so the pack's marker says how many tasks it holds), 5 random. Its
    tasks' ids append their index in 3 hex digits. A collision between processes is
    caught by the pack's create-only write (a new id is drawn)."""
    if not 1 <= count <= 4096:
        raise ValueError(f"a pack holds 1 to 4096 tasks, not {count}")
    ms_now = int(time.time() * 1000)
    with _id_lock:
        last, seq = _pack_last
        if ms_now <= last:
            ms_now, seq = last, seq + 1
            if seq > 7:
                ms_now, seq = last + 1, 0
        else:
            seq = 0
        _pack_last[:] = [ms_now, seq]
    return f"{ms_now:012x}{8 | seq:x}{count - 1:03x}{os.urandom(3).hex()[:5]}"


def pack_size(pack_id: str) -> int:
    """How many tasks the pack ``pack_id`` was written with (its id says so)."""
    return int(pack_id[13:16], 16) + 1


def pack_of(task_id: str) -> tuple[str, int] | None:
    """(pack id, index) of a task that was submitted in a pack, else None."""
    if len(task_id) == 24 and PACK_ID.match(task_id[:21]) and TASK_ID.match(task_id):
        return task_id[:21], int(task_id[21:], 16)
    return None


def entry_id(pack_id: str, index: int) -> str:
    return f"{pack_id}{index:03x}"


def settings_key(queue: str) -> str:
    """The queue's shared settings and key layout (qo/queue_settings.py, qo/layout.py)."""
    return f"{queue}/settings.json"


def pack(queue: str, pack_id: str) -> str:
    return f"{queue}/packs/{pack_id}.json"


def packs_prefix(queue: str) -> str:
    return f"{queue}/packs/"


def task(queue: str, task_id: str) -> str:
    return f"{queue}/tasks/{task_id}.json"


def tasks_prefix(queue: str) -> str:
    return f"{queue}/tasks/"


def ready_prefix(queue: str) -> str:
    return f"{queue}/ready/"


def delayed_prefix(queue: str) -> str:
    return f"{queue}/delayed/"


def workers_prefix(queue: str) -> str:
    return f"{queue}/workers/"


def worker(queue: str, worker_id: str) -> str:
    return f"{queue}/workers/{worker_id}.json"


def idem_prefix(queue: str) -> str:
    return f"{queue}/idem/"


def idem(queue: str, namespace: str, key_hash: str) -> str:
    return f"{queue}/idem/{namespace}/{key_hash}.json"


def idem_expiry_prefix(queue: str) -> str:
    return f"{queue}/idem-exp/"


def idem_expiry(queue: str, expires_at: float, record_key: str) -> str:
    """The expiry marker of an idempotency record: ``{q}/idem-exp/{expires ms}-{ns~hash}``,
    so an ascending LIST yields the records in the order they expire."""
    tail = record_key[len(idem_prefix(queue)):].removesuffix(".json").replace("/", "~")
    return f"{queue}/idem-exp/{ms(expires_at):013d}-{tail}"


def parse_idem_expiry(queue: str, key: str) -> tuple[float, str] | None:
    """(expiry, record key) of an expiry marker at exactly its depth, or None."""
    prefix = idem_expiry_prefix(queue)
    if not is_direct_child(key, prefix):
        return None
    when, _, tail = key[len(prefix):].partition("-")
    if len(when) != 13 or not when.isdigit() or not tail or "~" not in tail:
        return None
    return int(when) / 1000, f"{idem_prefix(queue)}{tail.replace('~', '/')}.json"


def deps_root(queue: str) -> str:
    return f"{queue}/deps/"


def deps_prefix(queue: str, parent_id: str) -> str:
    return f"{queue}/deps/{parent_id}/"


def dep(queue: str, parent_id: str, child_id: str, child_type: str) -> str:
    return f"{queue}/deps/{parent_id}/{child_id}-{child_type}"


def is_direct_child(key: str, prefix: str) -> bool:
    """``key`` lies right under ``prefix`` (which ends in ``/``), not in a folder below
    it: a listing may reach into another store nested under this one's root."""
    return key.startswith(prefix) and "/" not in key[len(prefix):]


def task_id_of(key: str) -> str | None:
    """The task id of a ``{q}/tasks/{id}.json`` key, or None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[1] != "tasks" or not parts[2].endswith(".json"):
        return None
    task_id = parts[2][:-5]
    return task_id if TASK_ID.match(task_id) else None


def parse_dep(key: str) -> tuple[str, str, str] | None:
    """(parent id, child id, child type) of a ``{q}/deps/{parent}/{child}-{type}`` key,
    or None (any other depth: a store nested under ours is not ours)."""
    parts = key.split("/")
    if len(parts) != 4 or parts[1] != "deps":
        return None
    child_id, _, child_type = parts[3].partition("-")
    if not (TASK_ID.match(parts[2]) and TASK_ID.match(child_id) and TASK_TYPE.match(child_type)):
        return None
    return parts[2], child_id, child_type


def ms(ts: float) -> int:
    return int(round(ts * 1000))


def ready(queue: str, priority: int, due: float, task_id: str, task_type: str) -> str:
    return f"{queue}/ready/{255 - priority:03d}/{ms(due):013d}-{task_id}-{task_type}"


def delayed(queue: str, priority: int, due: float, task_id: str, task_type: str) -> str:
    return f"{queue}/delayed/{ms(due):013d}-{255 - priority:03d}-{task_id}-{task_type}"


#: ended/ keys sort newest first: (ENDED_EPOCH_MS - finished ms), 13 digits
ENDED_EPOCH_MS = 10**13 - 1


def ended_prefix(queue: str, status: str | None = None) -> str:
    return f"{queue}/ended/" + (f"{status}/" if status else "")


def ended(queue: str, status: str, finished_at: float, task_id: str, task_type: str) -> str:
    """The index marker of a task that ended ``status`` (failed, cancelled, skipped,
    expired) at ``finished_at``: ``{q}/ended/{status}/{inverted ms}-{id}-{type}``, so an
    ascending LIST is newest first and a time bound is a key bound."""
    return f"{queue}/ended/{status}/{ENDED_EPOCH_MS - ms(finished_at):013d}-{task_id}-{task_type}"


@attrs.frozen
class Ended:
    """A parsed ``ended/`` index key."""

    key: str
    status: str
    finished_at: float
    task_id: str
    task_type: str


def parse_ended(key: str) -> Ended | None:
    """Parse ``{q}/ended/{status}/{inv ms}-{id}-{type}`` at exactly that depth, or None."""
    parts = key.split("/")
    if len(parts) != 4 or parts[1] != "ended":
        return None
    inv, _, rest = parts[3].partition("-")
    task_id, _, task_type = rest.partition("-")
    if not (len(inv) == 13 and inv.isdigit() and TASK_ID.match(task_id) and TASK_TYPE.match(task_type)):
        return None
    return Ended(key, parts[2], (ENDED_EPOCH_MS - int(inv)) / 1000, task_id, task_type)


def id_time(task_id: str) -> float:
    """When a task id was made (its first 12 hex digits are milliseconds)."""
    return int(task_id[:12], 16) / 1000


def id_floor(when: float) -> str:
    """A key part below every task id made at or after ``when`` (ids are time-ordered)."""
    return f"{max(0, int(when * 1000)):012x}"


@attrs.frozen
class Marker:
    """A parsed ready or delayed marker key."""

    key: str
    kind: str  # "ready" | "delayed"
    priority: int
    due: float
    task_id: str  # a pack's marker: the pack id (21 hex characters)
    task_type: str

    @property
    def is_pack(self) -> bool:
        return len(self.task_id) == 21


def parse_marker(key: str) -> Marker | None:
    """Parse a marker key, ``{q}/ready/{inv}/{due}-{id}-{type}`` or
    ``{q}/delayed/{due}-{inv}-{id}-{type}``, at exactly that depth; ``None`` for anything
    else (ignored, never fatal; a store nested under ours is not ours)."""
    parts = key.split("/")
    try:
        if len(parts) == 4 and parts[1] == "ready" and len(parts[2]) == 3:
            inv, name = parts[2], parts[3]
            due_s, task_id, task_type = name.split("-", 2)
            kind = "ready"
        elif len(parts) == 3 and parts[1] == "delayed":
            due_s, inv, task_id, task_type = parts[2].split("-", 3)
            kind = "delayed"
        else:
            return None
        if not (due_s.isdigit() and inv.isdigit()):
            return None
        priority = 255 - int(inv)
        due = int(due_s) / 1000
    except (ValueError, IndexError):
        return None
    if not (0 <= priority <= 255 and (TASK_ID.match(task_id) or PACK_ID.match(task_id))
            and TASK_TYPE.match(task_type)):
        return None
    return Marker(key, kind, priority, due, task_id, task_type)


def payloads_prefix(queue: str, task_id: str) -> str:
    """Where the inputs and outputs of task ``task_id`` stored apart live."""
    return f"{queue}/payloads/{task_id}/"


def payload_input(queue: str, task_id: str) -> str:
    return f"{queue}/payloads/{task_id}/input.json"


_LEASE_PART = re.compile(r"^[0-9A-Za-z_]{1,64}\Z")


def payload_output(queue: str, task_id: str, attempt: int, lease_id: str | None) -> str:
    """The output of one attempt: its number and its claim's lease id make the key its
    own, so a late attempt never overwrites the output another attempt stored."""
    lease = lease_id or "none"
    if not _LEASE_PART.match(lease):
        import hashlib

        lease = hashlib.sha256(lease.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{queue}/payloads/{task_id}/output-{attempt}-{lease}.json"


def is_payload_key(key: str) -> bool:
    """``{q}/payloads/{id}/input.json`` or ``.../output-{n}-{lease}.json``, at that depth."""
    parts = key.split("/")
    if len(parts) != 4 or parts[1] != "payloads" or not TASK_ID.match(parts[2]):
        return False
    name = parts[3]
    if name == "input.json":
        return True
    if not (name.startswith("output-") and name.endswith(".json")):
        return False
    attempt, _, lease = name[len("output-"):-len(".json")].partition("-")
    return attempt.isdigit() and bool(_LEASE_PART.match(lease))
