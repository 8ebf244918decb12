"""Task dependencies: blocked tasks, pushed wake-ups, failure policies, graphs.

Objects: an edge ``deps/{parent}/{child}-{child type}`` per dependency (empty), written
before the child. Write order (docs/architecture.md, "Dependencies"):

- submit: edges, then the child (``blocked``, waiting on its unfinished parents), then
  a re-read of every parent: a parent that ended meanwhile is applied by the submitter.
- a parent ends: whoever ended it lists its edges and applies the outcome to each child
  by CAS (completed: one less to wait for; failed/cancelled/skipped: the child's
  policy), then deletes the edges.

Either the parent's ending happens before the submitter's re-read (the submitter sees
it), or after it, and then after the edge exists (the ender's LIST sees it): a child is
never left blocked by a race. Applying an outcome twice is harmless (the parent is no
longer in ``waiting_on``). A crash between a parent's end and its releases leaves the
edges; a bounded sweep finds them and finishes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import collections
import json
import logging
from typing import Any, Iterable

from . import keys, payloads
from .errors import CorruptObject, DependencyError, InvalidInput, PreconditionFailed, QoError, TaskNotFound
from .events import emit
from .model import BLOCKED, COMPLETED, FAILED, PENDING, SKIPPED, TERMINAL, Task, _short, check_task_id

log = logging.getLogger(__name__)

POLICIES = ("fail", "skip", "run")
#: Parents one task may have (``depends_on``, after de-duplication). Each is one edge
#: object, one GET at submit and one when the child starts.
MAX_DEPENDENCIES = 1000
#: ``ctx.dependencies`` hands a parent's output inline only while it is at most this many
#: bytes encoded ...
MAX_INLINE_OUTPUT_BYTES = 64 * 1024
#: ... and while the inline outputs of all the child's parents, in ``depends_on`` order,
#: stay within this total. Other outputs are handed by reference (``output_ref``) and
#: read on demand with ``ctx.dependency_output(id)``. Without the bound, 300 parents of
#: 250 KB would put 75 MB into every attempt of the child.
MAX_INLINE_OUTPUTS_BYTES = 1024 * 1024
#: Parents read at once for ``ctx.dependencies``: bounds the task objects in memory
#: (each holds at most ``PAYLOAD_INLINE_BYTES`` of input and of output inline; larger
#: values are stored apart, qo/payloads.py) while they are measured.
RESULTS_WINDOW = 16


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (the size a stored output takes). Lenient
    (NaN is encoded): a hand-edited parent's output is measured, not refused here."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def check_policy(value: Any, field: str = "on_dependency_failure") -> str:
    if value not in POLICIES:
        raise InvalidInput(field, f"{value!r} is not one of {', '.join(POLICIES)}")
    return value


def check_depends_on(value: Any, field: str = "depends_on") -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidInput(field, "must be a list of task ids")
    value = list(value)
    for i, task_id in enumerate(value):
        check_task_id(task_id, f"{field}[{i}]")
    ids = list(dict.fromkeys(value))  # de-duplicated, order kept
    if len(ids) > MAX_DEPENDENCIES:
        raise InvalidInput(field, f"names {len(ids)} tasks; the limit is {MAX_DEPENDENCIES} dependencies")
    for i, task_id in enumerate(ids):
        check_task_id(task_id, f"{field}[{i}]")
    return ids


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle in ``name -> [names it depends on]`` as ``[a, b, ..., a]``, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in graph:
        if colour[start] != WHITE:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = [start]
        colour[start] = GREY
        while stack:
            node, i = stack[-1]
            edges = graph[node]
            if i < len(edges):
                stack[-1] = (node, i + 1)
                nxt = edges[i]
                if nxt not in colour:
                    continue  # an existing task id, not a node of the graph
                if colour[nxt] == GREY:
                    return path[path.index(nxt):] + [nxt]
                if colour[nxt] == WHITE:
                    colour[nxt] = GREY
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                colour[node] = BLACK
                stack.pop()
                path.pop()
    return None


def topological(graph: dict[str, list[str]]) -> list[str]:
    """Graph nodes, dependencies first (the graph must be acyclic)."""
    out: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for d in graph[n]:
            if d in graph:
                visit(d)
        out.append(n)

    for n in graph:
        visit(n)
    return out


_UNREADABLE = object()  # a child whose object cannot be read (``release``)


class Dependencies:
    """Blocking, releasing and sweeping the dependents of a queue's tasks."""

    def __init__(self, queue: Any):
        self.queue = queue
        self.store = queue.store
        self._seen: dict[str, tuple[Task, str]] = {}  # parents read by check_parents

    def edge(self, parent: str, child: Task) -> str:
        return keys.dep(self.queue.name, parent, child.id, child.task_type)

    async def check_parents(self, ids: list[str], known: Iterable[str] = ()) -> dict[str, Task]:
        """Read every parent not in ``known``; unknown ids are one DependencyError naming them."""
        todo = [i for i in ids if i not in set(known)]
        results = await asyncio.gather(*(self._maybe(i, remember=True) for i in todo))
        missing = [i for i, t in zip(todo, results) if t is None]
        if missing:
            raise DependencyError(f"unknown dependency ids: {', '.join(missing)}")
        return {t.id: t for t in results if t is not None}

    async def _maybe(self, task_id: str, remember: bool = False) -> Task | None:
        try:
            task, etag = await self.store.load(task_id)
        except TaskNotFound:
            return None
        if remember:  # _mark_parent can CAS this version without reading it again
            if len(self._seen) > 10000:
                self._seen.clear()
            self._seen[task_id] = (task, etag)
        return task

    async def write_blocked(self, task: Task) -> Task:
        """Edges, then the blocked task, then a re-read of its parents (see module doc)."""
        waiting = list(task.waiting_on)  # completed parents need no edge
        await asyncio.gather(*(self.store.put_marker(self.edge(p, task)) for p in waiting))
        await asyncio.gather(*(self._mark_parent(p) for p in waiting))
        await self.store.create(task)
        emit(self.queue.plugins, "submitted", task)
        parents = await asyncio.gather(*(self._maybe(p) for p in waiting))
        for parent in parents:
            if parent is not None and parent.status in TERMINAL:
                task = await self.apply(task.id, parent) or task
        return task

    async def _mark_parent(self, parent_id: str) -> None:
        """Flag the parent as having dependents, so its ender reads its edges. The ender's
        final CAS is made over the latest version: if our flag came first, it sees it; if
        the ending came first, our re-read of the parent after writing the child sees that."""
        seen = self._seen.pop(parent_id, None)
        while True:
            if seen is not None:
                (parent, etag), seen = seen, None
            else:
                try:
                    parent, etag = await self.store.load(parent_id)
                except TaskNotFound:
                    return
            if parent.has_dependents:
                return
            parent.has_dependents = True
            try:
                await self.store.replace(parent, etag)
                return
            except PreconditionFailed:
                continue

    async def apply(self, child_id: str, parent: Task) -> Task | None:
        """Apply ``parent``'s end to one child by CAS; returns the child as stored."""
        while True:
            try:
                child, etag = await self.store.load(child_id)
            except TaskNotFound:
                return None  # its submitter has not written it yet; it re-reads us itself
            if child.status != BLOCKED or parent.id not in child.waiting_on:
                if child.status == PENDING and parent.id in child.depends_on:
                    # applied before; the applier may have died before writing the marker
                    await self.store.put_marker(child.marker_key(self.queue.name, self.queue.clock.now()))
                elif parent.id in child.depends_on and child.ended_key(self.queue.name) is not None:
                    await self.store.put_marker(child.ended_key(self.queue.name))  # ... or its index
                return child
            now = self.queue.clock.now()
            decision = "run"
            if parent.status != COMPLETED:
                decision = self.queue.plugins.hook.qo_on_dependency_failed(task=child, dependency=parent)
                decision = check_policy(decision if decision is not None else child.on_dependency_failure,
                                        "qo_on_dependency_failed")
            marker = None
            if decision == "run":
                child.waiting_on = [p for p in child.waiting_on if p != parent.id]
                if not child.waiting_on:
                    child.status = PENDING
                    child.available_at = max(now, child.available_at)
                    marker = child.marker_key(self.queue.name, now)
            else:
                child.status = FAILED if decision == "fail" else SKIPPED
                child.finished_at = now
                child.last_error = {
                    "type": "DependencyFailed", "attempt": child.attempt, "traceback": "",
                    "message": f"dependency {parent.id} ({parent.task_type}) ended {parent.status}",
                }
            child.updated_at = now
            try:
                await self.store.replace(child, etag)
            except PreconditionFailed:
                continue
            if marker is None:
                marker = child.ended_key(self.queue.name)  # failed or skipped: indexed
            if marker is not None:  # after the task: the edge still points here until then
                await self.store.put_marker(marker)
            others = [keys.dep(self.queue.name, p, child.id, child.task_type) for p in child.depends_on
                      if p != parent.id]
            if child.status != BLOCKED and others:
                # no longer waiting: the edges other parents kept for it (release) go now
                # (a failure here is mended by the edge sweep)
                with contextlib.suppress(QoError):
                    await self.store.delete_markers(others)
            if child.status in TERMINAL:
                emit(self.queue.plugins, "failed" if child.status == FAILED else child.status, child)
            return child

    async def release(self, parent: Task) -> int:
        """Apply a terminal ``parent`` to all its dependents, and theirs in turn."""
        if parent.status not in TERMINAL or not parent.has_dependents:
            return 0  # no dependent was ever written: no edges to read (no LIST per task)
        done = 0
        todo = [parent]
        while todo:
            p = todo.pop()
            prefix = keys.deps_prefix(self.queue.name, p.id)
            cursor: str | None = None
            while True:
                edges = await self.store.list(prefix, start_after=cursor, limit=1000)
                if not edges:
                    break
                applied = await asyncio.gather(*(self._apply_edge(e.key, p) for e in edges))
                for child in applied:
                    if isinstance(child, Task) and child.status in (FAILED, SKIPPED):
                        todo.append(child)  # propagate down the graph
                # an unreadable child costs itself, not its siblings' wake-ups; a child still
                # blocked on other parents keeps this edge: it will read this parent's output
                # when it runs, and retention keeps a parent while an edge names a dependent
                handled = [e.key for e, child in zip(edges, applied)
                           if child is not _UNREADABLE and not (isinstance(child, Task) and child.status == BLOCKED)]
                done += len(handled)
                await self.store.delete_markers(handled)
                if len(edges) < 1000:
                    break
                cursor = edges[-1].key
        return done

    async def _apply_edge(self, key: str, parent: Task) -> Task | None | object:
        """Apply ``parent`` to the child an edge names; ``_UNREADABLE`` (the edge is kept)
        if a newer release wrote the child; None for an edge to drop."""
        edge = keys.parse_dep(key)
        if edge is None:
            return None
        try:
            return await self.apply(edge[1], parent)
        except CorruptObject as exc:
            # reported where read; its wake-up is lost with it (a person mending it sets
            # it pending), unless a newer release wrote it: then its edge waits for that one
            return _UNREADABLE if exc.newer else None

    async def sweep(self, cursor: str | None, *, limit: int = 200) -> str | None:
        """Repair lost wake-ups: edges whose parent already ended. Returns the next cursor."""
        edges = await self.store.list(keys.deps_root(self.queue.name), start_after=cursor, limit=limit)
        parents = {keys.parse_dep(e.key)[0] for e in edges if keys.parse_dep(e.key)}
        for parent_id in parents:
            try:
                parent = await self._maybe(parent_id)
            except CorruptObject:
                continue  # reported; its edges wait (a person can fix or remove it)
            if parent is not None and parent.status in TERMINAL and not parent.has_dependents:
                parent.has_dependents = True  # edges without the flag: a submitter died between
            if parent is None or parent.status in TERMINAL:
                if parent is None:  # a dependency cannot vanish; drop its edges
                    await self.store.delete_markers(
                        [e.key for e in await self.store.list(keys.deps_prefix(self.queue.name, parent_id))])
                else:
                    await self.release(parent)
        return edges[-1].key if len(edges) >= limit else None

    async def blocked_types(self) -> set[str]:
        """Task types that have a blocked task waiting somewhere (from the edges)."""
        edges = await self.store.list(keys.deps_root(self.queue.name), limit=1000)
        return {d[2] for d in (keys.parse_dep(e.key) for e in edges) if d}

    async def results(self, task: Task) -> dict[str, dict[str, Any]]:
        """Each dependency's status and output, for a handler's ``ctx.dependencies``.

        An entry is ``{"status", "output", "task_type"}`` while the parent's output is
        inline: at most ``MAX_INLINE_OUTPUT_BYTES`` encoded and within the running total
        ``MAX_INLINE_OUTPUTS_BYTES`` (parents counted in ``depends_on`` order, so the
        choice is the same on every attempt). A larger output is handed by reference:
        ``"output": None, "output_ref": <parent id>, "output_bytes": <encoded size>``;
        ``ctx.dependency_output(id)`` reads it. At most ``RESULTS_WINDOW`` parents are
        read ahead, so memory stays bounded whatever the number and size of the outputs.
        """
        out: dict[str, dict[str, Any]] = {}
        inline = 0
        ids = iter(task.depends_on)
        window: collections.deque[tuple[str, asyncio.Task[Task | None]]] = collections.deque()

        def read_ahead() -> None:
            while len(window) < RESULTS_WINDOW and (pid := next(ids, None)) is not None:
                window.append((pid, asyncio.ensure_future(self._maybe(pid))))

        try:
            read_ahead()
            while window:
                pid, pending = window.popleft()
                parent = await pending
                read_ahead()
                if parent is None:
                    out[pid] = {"status": "missing", "output": None, "task_type": None}
                    continue
                entry = {"status": parent.status, "output": parent.output, "task_type": parent.task_type}
                if parent.output_ref is not None:  # stored apart (qo/payloads.py): always by reference
                    entry.update(output=None, output_ref=pid, output_bytes=parent.output_ref["bytes"])
                elif parent.output is not None:
                    size = encoded_size(parent.output)
                    if size > MAX_INLINE_OUTPUT_BYTES or inline + size > MAX_INLINE_OUTPUTS_BYTES:
                        entry.update(output=None, output_ref=pid, output_bytes=size)
                    else:
                        inline += size
                out[pid] = entry
        finally:
            for _, pending in window:  # an error (or a cancel) ends the reads still in flight
                if pending.done() and not pending.cancelled():
                    pending.exception()  # retrieved: asyncio does not log it as lost
                pending.cancel()
        return out

    async def output(self, task: Task, parent_id: Any) -> Any:
        """The output of ``parent_id``, one of ``task``'s dependencies, read now (for an
        entry of ``ctx.dependencies`` handed by reference). ``InvalidInput`` naming
        ``task_id`` if it is not a dependency of ``task``; ``TaskNotFound`` if it is gone.
        An output stored apart is read from its payload object (one more GET;
        ``CorruptObject`` naming its key if it is missing or altered)."""
        if not isinstance(parent_id, str) or parent_id not in task.depends_on:
            raise InvalidInput("task_id", f"{_short(parent_id)} is not a dependency of task {task.id}")
        parent = await self._maybe(parent_id)
        if parent is None:
            raise TaskNotFound(parent_id)
        return await payloads.load(self.queue, parent, "output")
