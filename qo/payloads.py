"""Inputs and outputs stored apart from their task (docs/architecture.md §5i).

A task object is read on every claim and CASed on every change, so a value over
``model.PAYLOAD_INLINE_BYTES`` encoded is stored as an object of its own under
``{q}/payloads/{id}/`` and the task keeps a reference, ``{"key", "bytes", "sha256"}``,
in ``input_ref``/``output_ref`` (the value's field is then None). The stored bytes are
the value's canonical JSON (``model.dumps``), so the checksum is the idempotency input
hash of the same value.

Write orders: an input's payload is written (create-only) before the task's marker and
the task, so a task never exists without it; an output's payload is written before the
finish CAS that names it. Reading checks the length and the SHA-256, then decodes with
the depth bound of every stored object: anything else is a ``CorruptObject`` naming
the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from . import keys, model, stored
from .errors import CorruptObject, Fail, NotFound, PreconditionFailed, QoError
from .model import Task, dumps, encode_value

log = logging.getLogger(__name__)

WHICH = ("input", "output")


def make_ref(key: str, data: bytes) -> dict[str, Any]:
    """The reference a task keeps to ``data`` stored at ``key``."""
    return {"key": key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def human_size(n: int) -> str:
    """``2.1 MiB``, ``195.3 KiB``, ``812 B``: for ``qo status``."""
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


async def offload_input(queue: Any, task: Task) -> None:
    """Store ``task``'s input apart if it is over the threshold: PUT it create-only at
    ``payloads/{id}/input.json`` (the id is final here), then set ``input=None`` and
    ``input_ref``. Called first by every task create, before its marker or edges.

    A create refused because the object exists is accepted: only the same input can be
    written under the same id again (a retry after a lost response; an idempotent
    submit under the recorded id, whose input hash matched), and the checksum on read
    catches anything else. A task whose input is already stored apart is left alone."""
    if task.input_ref is not None or task.input is None:
        return
    data = dumps(task.input)
    if len(data) <= model.PAYLOAD_INLINE_BYTES:
        return
    key = keys.payload_input(queue.name, task.id)
    store = queue.store
    try:
        await store.backoff.call(lambda: store.storage.put(key, data, if_none_match=True))
    except PreconditionFailed:
        pass  # already there: see above
    task.input, task.input_ref = None, make_ref(key, data)


async def store_output(queue: Any, task: Task, output: Any,
                       inline: int | None = None) -> tuple[Any, dict[str, Any] | None]:
    """A handler's ``output`` as the finish CAS should store it: ``(value, None)`` when
    at most ``inline`` bytes (default ``PAYLOAD_INLINE_BYTES``), else ``(None, ref)``
    once it is PUT at this attempt's own key. ``InvalidInput`` naming ``output`` if it
    is not JSON or over ``MAX_PAYLOAD_BYTES``; a storage error as raised (the attempt
    fails and is retried)."""
    cap = model.PAYLOAD_INLINE_BYTES if inline is None else inline
    if output is None and min(cap, model.MAX_PAYLOAD_BYTES) >= len(b"null"):  # what most handlers return
        return None, None
    data = encode_value(output, "output")
    if len(data) <= cap:
        return json.loads(data), None
    key = keys.payload_output(queue.name, task.id, task.attempt, task.lease_id)
    store = queue.store
    await store.backoff.call(lambda: store.storage.put(key, data))  # the attempt's own key
    return None, make_ref(key, data)


async def discard_output(queue: Any, ref: dict[str, Any]) -> None:
    """Delete the output an attempt stored but could not record (its lease was lost):
    best effort, its key is its own. A failure leaves it for purge (or by hand)."""
    try:
        await queue.store.delete_markers([ref["key"]])
    except QoError as exc:
        log.warning("could not delete the discarded output %s: %s", ref["key"], exc)


async def load(queue: Any, task: Task, which: str = "output") -> Any:
    """The task's ``input`` or ``output``: the inline value, or the one stored apart
    (one GET). ``CorruptObject`` naming the payload's key if it is missing, not the
    length or checksum its reference says, not JSON, or the reference points outside
    ``payloads/{task id}/``."""
    if which not in WHICH:
        from .errors import InvalidInput

        raise InvalidInput("which", f"{which!r} is not one of {', '.join(WHICH)}")
    ref = getattr(task, f"{which}_ref")
    if ref is None:
        return getattr(task, which)
    key, backend = ref["key"], queue.storage.name
    refused = _refused(queue.name, task.id, which, ref)
    if refused:
        raise CorruptObject(keys.task(queue.name, task.id), f"its {which}_ref {refused}", backend=backend)
    store = queue.store
    try:
        blob = await store.backoff.call(lambda: store.storage.get(key))
    except NotFound:
        raise CorruptObject(key, f"the {which} of task {task.id} stored apart is missing",
                            backend=backend) from None
    data = blob.data
    if len(data) != ref["bytes"]:
        raise CorruptObject(key, f"the {which} of task {task.id} stored apart is not what was written "
                            f"({len(data)} bytes, its {which}_ref says {ref['bytes']})", backend=backend)
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise CorruptObject(key, f"the {which} of task {task.id} stored apart is not what was written "
                            f"(its SHA-256 is not the one its {which}_ref says)", backend=backend)
    try:
        text = data.decode("utf-8")
        if stored.too_deep(text, stored.MAX_DEPTH):
            raise ValueError("nested too deeply")
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CorruptObject(key, f"the {which} of task {task.id} stored apart is not JSON ({exc})",
                            backend=backend) from None


def _refused(queue: str, task_id: str, which: str, ref: dict[str, Any]) -> str | None:
    """Why a reference cannot be this task's ``which`` (None when it can): it must name
    a payload of this task (``payloads/{id}/``), of its kind (the input, or an attempt's
    output), of at most ``MAX_PAYLOAD_BYTES``; checked before anything is read."""
    key = ref["key"]
    if not (key.startswith(keys.payloads_prefix(queue, task_id)) and keys.is_payload_key(key)):
        return f"names {key!r}, not a payload of this task"
    if (key.rsplit("/", 1)[1] == "input.json") != (which == "input"):
        return f"names {key!r}, not the {which} of this task"
    if ref["bytes"] > model.MAX_PAYLOAD_BYTES:
        return f"says {ref['bytes']} bytes, over the {model.MAX_PAYLOAD_BYTES} a payload may be"
    return None


async def attempt_input(queue: Any, task: Task) -> Any:
    """The input a claimed attempt hands its handler. A payload that cannot be used
    (missing, altered, not JSON) will not heal: ``Fail`` (no retry) naming its key."""
    try:
        return await load(queue, task, "input")
    except CorruptObject as exc:
        raise Fail(f"input stored apart is unusable: {exc.reason} (key {exc.key!r})") from None


async def delete_for(queue: Any, task_ids: list[str]) -> None:
    """Delete every object under ``payloads/{id}/`` of each task (before the tasks
    themselves: a crash in between leaves a task past its retention, deleted next pass)."""
    doomed: list[str] = []
    for task_id in task_ids:
        cursor: str | None = None
        while True:
            page = await queue.store.list(keys.payloads_prefix(queue.name, task_id), start_after=cursor)
            doomed += [e.key for e in page if keys.is_payload_key(e.key)]
            if len(page) < 1000:
                break
            cursor = page[-1].key
    for i in range(0, len(doomed), 1000):
        await queue.store.delete_markers(doomed[i:i + 1000])
