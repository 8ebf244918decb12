"""The Queue: submit, inspect, cancel and retry tasks of one named queue."""

from __future__ import annotations

import asyncio
import logging
import datetime as dt
import math
import os
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Sequence

from . import keys, pack_submit
from .backends import default_url, open_storage, url_scheme
from .clock import Clock, SystemClock
from .errors import DependencyError, InvalidInput, PreconditionFailed, QoError, TaskNotFound, TaskStateError
from .dependencies import Dependencies, check_depends_on, check_policy, find_cycle, topological
from .events import emit
from .model import (
    BLOCKED,
    CANCELLED,
    COMPLETED,
    ENDED_INDEXED,
    EXPIRED,
    FAILED,
    PENDING,
    RUNNING,
    STATUSES,
    TERMINAL,
    Task,
    check_expires_at,
    check_input,
    check_non_negative_int,
    check_priority,
    check_seconds,
    check_task_id,
    check_task_type,
    check_when,
    _short,
)
from .limits import Limits, check_rate_limit_key
from .listing import list_tasks
from .meter import meter_of
from .idempotency import DEFAULT_TTL_DAYS, Idempotency, IdempotencyRequest, check_request
from .payloads import load as load_payload, offload_input
from .plugins import Plugins, get_plugins
from .layout import Layout, SpreadStorage, check_shards
from .queue_settings import TASK_DEFAULTS, QueueSettings
from .storage import Storage
from .store import TaskStore
from .transitions import requeued_at

GRAPH_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}\Z")
if TYPE_CHECKING:  # pragma: no cover
    from .pages import TaskPage
    from .schedules import Schedules

QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")

#: A marker whose task cannot be read (not yet written, or its producer died) is left
#: alone this long before a worker drops it. A producer re-writes its marker when its
#: own writes took longer than half of this, so a live producer never loses a task.
ORPHAN_GRACE_SECONDS = 120.0

log = logging.getLogger(__name__)

SUBMIT_OPTIONS = (
    "priority", "schedule_at", "max_retries", "timeout_seconds",
    "idempotency_key", "idempotency_scope", "idempotency_ttl_days",
    "depends_on", "on_dependency_failure", "rate_limit_key", "expires_at",
)


def validate_queue_name(name: Any) -> str:
    if not isinstance(name, str) or not QUEUE_NAME.match(name) or ".." in name:
        raise InvalidInput(
            "queue", f"{_short(name)} is not a queue name (1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric)"
        )
    return name


class BulkSubmitError(QoError):
    """Some tasks of a ``submit_many`` were not written; ``tasks`` holds those that were."""

    def __init__(self, tasks: list[Task | None], errors: list[tuple[int, BaseException]]):
        self.tasks = tasks
        self.errors = errors
        first = errors[0][1]
        super().__init__(f"{len(errors)} of {len(tasks)} tasks were not submitted; first error: {first}")


class Queue:
    """A queue named ``name`` in ``storage``; its objects live under ``{name}/``."""

    def __init__(
        self,
        storage: Storage,
        name: str = "default",
        *,
        plugins: Plugins | None = None,
        clock: Clock | None = None,
        url: str = "",
    ):
        self.name = validate_queue_name(name)
        #: requests made through ``storage`` so far, by operation (qo/meter.py; shared by
        #: the queues opened on the same storage object)
        self.requests = meter_of(storage)
        #: the backend seen through the queue's key layout (qo/layout.py): the engine's
        #: keys are logical, the wrapper stores them where the layout says
        self.storage = SpreadStorage(storage, self.name, loader=lambda: self.settings.read_once())
        #: the backend itself, as opened (keys as stored)
        self.backend = storage
        self.plugins = plugins or get_plugins()
        self.clock = clock or SystemClock(storage)
        self.url = url
        self.store = TaskStore(self.storage, self.name)
        self.idempotency = Idempotency(self)
        self.dependencies = Dependencies(self)
        #: the queue's shared settings in the bucket (``qo/queue_settings.py``)
        self.settings = QueueSettings(self)

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} on {self.storage!r}>"

    @property
    def schedules(self) -> "Schedules":
        """The recurring schedules of this queue (``qo/schedules.py``), created on first use."""
        from .schedules import Schedules

        if getattr(self, "_schedules", None) is None:
            self._schedules = Schedules(self)
        return self._schedules

    # -- submit -------------------------------------------------------------------

    def build_task(self, task_type: str, input: Any = None, **options: Any) -> Task:
        """Validate everything and build the task, writing nothing. Options not given take
        the queue's settings as last read (``queue.settings``), else the built-in defaults."""
        defaults = {**TASK_DEFAULTS, **{k: v for k, v in self.settings.cached.items() if k in TASK_DEFAULTS}}
        return self._prepare(task_type, input, options, defaults)[0]

    def _prepare(self, task_type: str, input: Any, options: dict[str, Any],
                 defaults: dict[str, Any]) -> tuple[Task, IdempotencyRequest | None]:
        unknown = sorted(set(options) - set(SUBMIT_OPTIONS))
        if unknown:
            raise InvalidInput(unknown[0], f"unknown task option (known: {', '.join(SUBMIT_OPTIONS)})")
        # an option not given (or None) takes the queue's default
        options = {**options, **{k: v for k, v in defaults.items() if options.get(k) is None}}
        now = self.clock.now()
        schedule_at = check_when(options.get("schedule_at"))
        task = Task(
            id=keys.new_task_id(),  # local time: ids sort by submission within a process
            task_type=check_task_type(task_type),
            input=check_input(input),
            status=PENDING,
            priority=check_priority(options["priority"]),
            max_retries=check_non_negative_int(options["max_retries"], "max_retries"),
            timeout_seconds=check_seconds(options["timeout_seconds"], "timeout_seconds"),
            available_at=max(now, schedule_at) if schedule_at is not None else now,
            created_at=now,
            updated_at=now,
            depends_on=check_depends_on(options.get("depends_on")),
            on_dependency_failure=check_policy(options.get("on_dependency_failure", "fail")),
            rate_limit_key=check_rate_limit_key(options.get("rate_limit_key")),
            expires_at=check_expires_at(options.get("expires_at"), now, schedule_at),
        )
        request = check_request(options.get("idempotency_key"), options.get("idempotency_scope", "task_type"),
                                options.get("idempotency_ttl_days", DEFAULT_TTL_DAYS))
        if request is not None:
            self.idempotency.namespace(request, task.task_type)  # a plugin's bad answer fails here
            task.idempotency_expires_at = now + request.ttl_days * 86400  # retention waits for it
        return task, request

    async def submit(
        self,
        task_type: str,
        input: Any = None,
        *,
        priority: int | str | None = None,
        schedule_at: datetime | None = None,
        max_retries: int | None = None,
        timeout_seconds: float | None = None,
        idempotency_key: str | None = None,
        idempotency_scope: str = "task_type",
        idempotency_ttl_days: float = DEFAULT_TTL_DAYS,
        depends_on: Iterable[str] | None = None,
        on_dependency_failure: str = "fail",
        rate_limit_key: str | None = None,
        expires_at: datetime | None = None,
    ) -> Task:
        """Submit one task; it runs once due (``schedule_at``) on a worker handling ``task_type``.

        With ``idempotency_key``, the same key in the same scope returns the existing task
        (same id) for ``idempotency_ttl_days`` instead of creating another. With
        ``depends_on``, the task is ``blocked`` until every listed task has completed;
        ``on_dependency_failure`` ("fail", "skip", "run") says what a failed or cancelled
        dependency does to it. ``rate_limit_key`` puts the task under the ``key:<key>``
        (or ``key:*``) limit. With ``expires_at`` (an aware datetime, later than now and
        than ``schedule_at``), a task no worker has started by then ends ``expired``
        instead of running (a terminal status; its dependents take it as failed).
        ``priority`` (128), ``max_retries`` (3) and
        ``timeout_seconds`` (300) not given take the queue's settings (``queue.settings``).
        """
        options = dict(priority=priority, schedule_at=schedule_at, max_retries=max_retries,
                       timeout_seconds=timeout_seconds, idempotency_key=idempotency_key,
                       idempotency_scope=idempotency_scope, idempotency_ttl_days=idempotency_ttl_days,
                       depends_on=depends_on, on_dependency_failure=on_dependency_failure,
                       rate_limit_key=rate_limit_key, expires_at=expires_at)
        task, request = self._prepare(task_type, input, options, await self.settings.task_defaults())
        return await self._submit(task, request)

    async def _submit(self, task: Task, request: IdempotencyRequest | None, known: Iterable[str] = ()) -> Task:
        if task.depends_on:
            parents = await self.dependencies.check_parents(task.depends_on, known)
            task.waiting_on = [p for p in task.depends_on if p not in parents or parents[p].status != COMPLETED]
            if task.waiting_on:
                task.status = BLOCKED
        if request is not None:
            return await self.idempotency.submit(task, request)
        return await self._write_new(task)

    async def submit_many(
        self,
        items: Iterable[Sequence[Any]],
        *,
        concurrency: int = 32,
        progress: Callable[[int, int], None] | None = None,
        bulk: bool = True,
    ) -> list[Task]:
        """Submit many ``(type, input[, options])`` tuples; all are validated before any is written.

        ``options`` takes the keyword arguments of :meth:`submit`. Returns the tasks in
        order (for an idempotency key already used: the existing task). With ``bulk``
        (the default), tasks that carry no idempotency key, dependency, rate-limit key,
        expiry or future due time are written in packs of up to 256 (two requests a
        pack; each task keeps its own id, status, retries and outcome: docs/architecture.md
        §5k); ``bulk=False`` writes one object per task.
        """
        prepared: list[tuple[Task, IdempotencyRequest | None]] = []
        if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
            raise InvalidInput("items", "must be a list of (task_type, input[, options]) tuples")
        defaults = await self.settings.task_defaults()
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or not 1 <= len(item) <= 3:
                raise InvalidInput(f"items[{i}]", "must be (task_type, input) or (task_type, input, options)")
            options = item[2] if len(item) == 3 else {}
            if not isinstance(options, dict):
                raise InvalidInput(f"items[{i}].options", "must be a dict")
            try:
                prepared.append(self._prepare(item[0], item[1] if len(item) > 1 else None, options, defaults))
            except InvalidInput as exc:
                raise InvalidInput(f"items[{i}].{exc.field}", exc.message) from None
        check_non_negative_int(concurrency, "concurrency", 1024)
        if not isinstance(bulk, bool):
            raise InvalidInput("bulk", "must be True or False")
        tasks: list[Task] = [t for t, _ in prepared]
        sem = asyncio.Semaphore(max(1, concurrency))
        done = 0
        errors: list[tuple[int, BaseException]] = []

        def count(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, len(tasks))

        async def one(i: int, task: Task, request: IdempotencyRequest | None) -> None:
            async with sem:
                try:
                    tasks[i] = await self._submit(task, request)
                except QoError as exc:
                    errors.append((i, exc))
                    return
            count(1)

        packs, single = pack_submit.plan(prepared, self.clock.now()) if bulk else ([], range(len(prepared)))
        await asyncio.gather(
            pack_submit.write_packs(self, tasks, packs, concurrency=concurrency, grace=ORPHAN_GRACE_SECONDS,
                                    done=count, errors=errors),
            *(one(i, *prepared[i]) for i in single))
        if errors:
            failed = {i for i, _ in errors}
            raise BulkSubmitError([None if i in failed else t for i, t in enumerate(tasks)], sorted(errors, key=lambda e: e[0]))
        return tasks

    async def submit_graph(self, nodes: dict[str, dict[str, Any]]) -> dict[str, Task]:
        """Submit tasks that depend on each other by local names; returns name -> Task.

        ``nodes`` maps a name to ``{"task_type": ..., "input": ..., "depends_on": [names or
        existing task ids], **submit options}``. A cycle (spelled out), a self-reference, a
        dangling name or an unknown id is a ``DependencyError`` before anything is written.
        """
        if not isinstance(nodes, dict) or not nodes:
            raise InvalidInput("nodes", "must be a non-empty dict of name -> task spec")
        graph: dict[str, list[str]] = {}
        for name, spec in nodes.items():
            if not isinstance(name, str) or not GRAPH_NAME.match(name):
                raise InvalidInput("nodes", f"{_short(name)} is not a node name (letters, digits, _ . : -)")
            if not isinstance(spec, dict) or "task_type" not in spec:
                raise InvalidInput(f"nodes[{name}]", "must be a dict with at least 'task_type'")
            deps = spec.get("depends_on") or []
            if isinstance(deps, str) or not isinstance(deps, (list, tuple)):
                raise InvalidInput(f"nodes[{name}].depends_on", "must be a list of node names or task ids")
            for d in deps:
                if not isinstance(d, str):
                    raise InvalidInput(f"nodes[{name}].depends_on", f"{d!r} is not a node name or task id")
                if d not in nodes and not (isinstance(d, str) and keys.TASK_ID.match(d)):
                    raise DependencyError(f"node {name!r} depends on {d!r}, which is neither a node of the "
                                          "graph nor a task id")
            graph[name] = list(deps)
        cycle = find_cycle(graph)
        if cycle:
            raise DependencyError("cycle: " + " -> ".join(cycle))
        defaults = await self.settings.task_defaults()
        prepared: dict[str, tuple[Task, IdempotencyRequest | None]] = {}
        for name in graph:
            spec = {k: v for k, v in nodes[name].items() if k not in ("task_type", "input", "depends_on")}
            try:
                prepared[name] = self._prepare(nodes[name]["task_type"], nodes[name].get("input"), spec, defaults)
            except InvalidInput as exc:
                raise InvalidInput(f"nodes[{name}].{exc.field}", exc.message) from None
        for name, (task, _) in prepared.items():
            task.depends_on = [prepared[d][0].id if d in prepared else d for d in graph[name]]
        outside = sorted({d for deps in graph.values() for d in deps if d not in graph})
        await self.dependencies.check_parents(outside)
        ours = {t.id for t, _ in prepared.values()}
        out: dict[str, Task] = {}
        for name in topological(graph):  # parents first: a child's re-read sees them
            task, request = prepared[name]
            out[name] = await self._submit(task, request, known=ours)
        return {name: out[name] for name in nodes}

    async def _write_new(self, task: Task) -> Task:
        """Marker first, then the task: a marker without its task is an orphan workers
        drop after ORPHAN_GRACE_SECONDS; a task is never without its marker.
        A blocked task has edges instead of a marker (qo/dependencies.py). A large input
        is stored apart before either (qo/payloads.py): a task never lacks its payload."""
        await offload_input(self, task)
        if task.status == BLOCKED:
            return await self.dependencies.write_blocked(task)
        started = self.clock.now()
        marker = task.marker_key(self.name, started)
        await self.store.put_marker(marker)
        await self.store.create(task)
        if self.clock.now() - started > ORPHAN_GRACE_SECONDS / 2:
            await self.store.put_marker(marker)  # a worker may have dropped it as an orphan
        emit(self.plugins, "submitted", task)
        return task

    # -- inspect ------------------------------------------------------------------

    async def get(self, task_id: str) -> Task:
        """The task as stored now; ``qo.TaskNotFound`` if there is none."""
        task, _ = await self.store.load(check_task_id(task_id))
        return task

    async def payload(self, task: Task, which: str = "output") -> Any:
        """``task``'s input or output (``which``): inline, or read from the object it is
        stored apart in (one GET; ``get`` leaves ``input``/``output`` None and the
        reference in ``input_ref``/``output_ref``). ``CorruptObject`` naming the payload's
        key if it is missing or not what was written (docs/architecture.md §5i)."""
        return await load_payload(self, task, which)

    async def wait(self, task_id: str, timeout: float | None = 30.0, *, poll: float = 0.05) -> Task:
        """Wait until the task is terminal and return it; ``TimeoutError`` after ``timeout``."""
        check_task_id(task_id)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        delay = poll
        while True:
            task = await self.get(task_id)
            if task.status in TERMINAL:
                return task
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"task {task_id} still {task.status} after {timeout}s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def list(
        self, status: str | None = None, task_type: str | None = None, limit: int | None = 100, *,
        newest_first: bool = False, since: datetime | dt.timedelta | float | None = None,
    ) -> AsyncIterator[Task]:
        """Tasks filtered by status and type, oldest first (``newest_first`` reverses);
        ``since``: only tasks created (failed, cancelled, skipped, expired: ended) at or
        after that time (an aware datetime, a timedelta back from now, or epoch seconds).

        The cost follows the result: each status is read from the index that projects it
        (``qo/listing.py``), then one GET per row. ``completed`` (and no status) scans
        ``tasks/``: bound it with ``since``."""
        if status is not None and status not in STATUSES:
            raise InvalidInput("status", f"{_short(status)} is not one of {', '.join(STATUSES)}")
        if task_type is not None:
            check_task_type(task_type)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidInput("limit", f"{_short(limit)} is not None or an integer >= 0")
        if not isinstance(newest_first, bool):
            raise InvalidInput("newest_first", "must be True or False")
        since_ts = self._since(since)
        if limit == 0:
            return
        async for task in list_tasks(self, status, task_type, limit, newest_first=newest_first, since=since_ts):
            yield task

    async def page(
        self, status: str | None = None, task_type: str | None = None,
        since: datetime | dt.timedelta | float | None = None, *, after: str | None = None, limit: int = 50,
    ) -> "TaskPage":
        """One page of tasks, newest first: ``qo.TaskPage`` with ``tasks``, ``next_cursor``
        (pass it as ``after`` for the next page; None: no more), the ``lists`` and
        ``reads`` it cost, and ``capped`` (it stopped at a bound). ``status``, ``task_type``
        and ``since`` filter as in :meth:`list`; ``limit``: 1 to 500.

        Bounded whatever the queue's history: at most 24 LISTs and ``max(limit, 200)``
        GETs a page, over the indexes :meth:`list` reads (``qo/pages.py``)."""
        from .pages import MAX_LIMIT, task_page

        if status is not None and status not in STATUSES:
            raise InvalidInput("status", f"{_short(status)} is not one of {', '.join(STATUSES)}")
        if task_type is not None:
            check_task_type(task_type)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput("limit", f"{_short(limit)} is not an integer from 1 to {MAX_LIMIT}")
        if after is not None and (not isinstance(after, str) or not after or len(after) > 1024):
            raise InvalidInput("after", f"{_short(after)} is not a cursor (a page's next_cursor)")
        return await task_page(self, status, task_type, self._since(since), after, limit)

    async def ended_times(self, status: str = "failed",
                          since: datetime | dt.timedelta | float | None = None) -> list[tuple[float, str, str]]:
        """``(ended_at, task_id, task_type)`` of the tasks that ended in ``status``
        (failed, cancelled, skipped or expired) at or after ``since``, newest first, from
        the ended index without reading a task: one LIST, so at most 1000 (1000 returned:
        there may be more)."""
        from .pages import ended_times

        if status not in ENDED_INDEXED:
            raise InvalidInput("status", f"{_short(status)} is not one of {', '.join(sorted(ENDED_INDEXED))}")
        return await ended_times(self, status, self._since(since))

    async def dependents(self, task_id: str) -> list[tuple[str, str]]:
        """``(task_id, task_type)`` of the tasks that wait on ``task_id`` (submitted with
        ``depends_on`` it, still blocked on it): one LIST, at most 1000."""
        from .pages import dependents

        return await dependents(self, check_task_id(task_id))

    def effective_priority(self, task: Task) -> int:
        """The priority ``task`` competes at now: its own unless it is pending and due,
        then what the aging policy (``qo_effective_priority``) gives for its wait. No request."""
        from .aging import task_effective_priority

        return task_effective_priority(self.plugins, task, self.clock.now())

    async def purge(self, status: str, older_than: dt.timedelta | float, task_type: str | None = None, *,
                    dry_run: bool = False, progress: Callable[[int, int], None] | None = None) -> int:
        """Delete the tasks of a finished ``status`` that ended more than ``older_than``
        ago (of ``task_type``); returns how many (with ``dry_run``: would be). Never a
        task whose idempotency key lives or that a dependent waits on. The cost follows
        what is deleted (``qo/retention.py``); a call reads at most 10,000 tasks."""
        from .retention import purge

        return (await purge(self, status, older_than, task_type, dry_run=dry_run, progress=progress)).deleted

    async def stats(self) -> dict[str, Any]:
        """The queue at a glance: counts by status, ready depth by priority band, the
        oldest due task's age, workers, schedules and limits. Its cost is bounded
        whatever the queue's history (``qo/stats.py`` states the bound)."""
        from .stats import queue_stats

        return await queue_stats(self)

    def _since(self, since: Any) -> float | None:
        if since is None:
            return None
        if isinstance(since, dt.timedelta):
            if since.total_seconds() < 0:
                raise InvalidInput("since", "must not be a negative duration")
            return self.clock.now() - since.total_seconds()
        if isinstance(since, datetime):
            return check_when(since, "since")
        if isinstance(since, (int, float)) and not isinstance(since, bool) and math.isfinite(since):
            return float(since)
        raise InvalidInput("since", f"{_short(since)} is not a datetime, a timedelta or epoch seconds")

    # -- change -------------------------------------------------------------------

    async def cancel(self, task_id: str, *, terminate: bool = False) -> Task:
        """Cancel a pending or blocked task; a failed one (a dead letter) is given up on: it
        leaves the dead letters as ``cancelled`` (its dependents took its failure already).
        A running one is marked ``cancel_requested``:
        it is not retried, and ends ``cancelled`` unless its attempt completes. Its worker
        learns it with its next heartbeat (``ctx.cancel_requested``); with ``terminate``,
        an async handler is then cancelled (``asyncio`` cancellation) and the task ends
        ``cancelled`` (a sync handler cannot be interrupted: it sees the flag)."""
        check_task_id(task_id)
        if not isinstance(terminate, bool):
            raise InvalidInput("terminate", "must be True or False")
        while True:
            task, etag = await self.store.load(task_id)
            now = self.clock.now()
            if task.status == FAILED:
                return await self._dismiss(task, etag, now)
            if task.status in TERMINAL:
                raise TaskStateError(f"task {task_id} is already {task.status}")
            if task.status == RUNNING:
                if task.cancel_requested:
                    await self._tell_worker(task, terminate)
                    return task
                task.cancel_requested = True
            else:
                old_markers = [
                    keys.ready(self.name, task.priority, task.available_at, task.id, task.task_type),
                    keys.delayed(self.name, task.priority, task.available_at, task.id, task.task_type),
                ]
                task.status, task.finished_at = CANCELLED, now
                # the ended/ index first: a crash before the CAS leaves an index marker
                # whose task is not cancelled, which every reader verifies and skips
                await self.store.put_marker(task.ended_key(self.name))
            task.updated_at = now
            try:
                await self.store.replace(task, etag)
            except PreconditionFailed:
                if task.status == CANCELLED:
                    await self.store.delete_markers([task.ended_key(self.name)])
                continue  # changed under us: look again
            if task.status == CANCELLED and "#entry:" not in etag:  # a task in a pack has no marker of its own
                await self.store.delete_markers(old_markers)
                emit(self.plugins, "cancelled", task)
                await self.dependencies.release(task)  # a cancelled dependency counts as failed
            else:
                await self._tell_worker(task, terminate)
            return task

    async def _dismiss(self, task: Task, etag: str, now: float) -> Task:
        """A dead letter given up on: failed -> cancelled. The new ``ended/`` marker is
        written before the CAS and the old one deleted after it, as for any end; a crash
        in between leaves an index marker every reader verifies against the task."""
        old = task.ended_key(self.name)
        task.status, task.finished_at, task.updated_at = CANCELLED, now, now
        await self.store.put_marker(task.ended_key(self.name))
        try:
            await self.store.replace(task, etag)
        except PreconditionFailed:
            await self.store.delete_markers([task.ended_key(self.name)])
            return await self.cancel(task.id)  # changed under us (retried?): look again
        if old is not None:
            await self.store.delete_markers([old])
        emit(self.plugins, "cancelled", task)
        return task

    async def _tell_worker(self, task: Task, terminate: bool) -> None:
        """Best effort: the stored ``cancel_requested`` is what counts; this only makes the
        running handler see it (at the worker's next heartbeat) or stops it (terminate)."""
        from .leases import request_cancel

        if task.worker_id is None:
            return
        try:
            await request_cancel(self.store, task.worker_id, task.id, terminate)
        except QoError as exc:
            log.warning("task %s: cancel stored, but its worker could not be told: %s", task.id, exc)

    async def retry(self, task_id: str) -> Task:
        """Put a failed (dead-lettered), cancelled or expired task back to pending, attempts
        reset. A retry is a fresh chance: its ``expires_at`` is cleared (never expires)."""
        check_task_id(task_id)
        marker: str | None = None
        while True:
            try:
                task, etag = await self.store.load(task_id)
            except TaskNotFound:
                if marker is not None:  # written for a version a purge took since: not needed
                    await self.store.delete_markers([marker])
                raise
            if task.status not in (FAILED, CANCELLED, EXPIRED):
                raise TaskStateError(f"task {task_id} is {task.status}; only failed, cancelled or expired tasks "
                                     "can be retried")
            ended = task.ended_key(self.name)  # leaves the ended/ index once pending again
            now = self.clock.now()
            task.status, task.attempt, task.updated_at = PENDING, 0, now
            task.available_at = requeued_at(task, now)
            task.finished_at = task.lease_id = task.lease_deadline = task.worker_id = None
            task.cancel_requested = False
            task.expires_at = None  # a fresh chance: it would expire again at once
            marker = task.marker_key(self.name, now)
            await self.store.put_marker(marker)  # marker first, as in submit
            try:
                await self.store.replace(task, etag)
            except PreconditionFailed:
                continue
            if self.clock.now() - now > ORPHAN_GRACE_SECONDS / 2:
                await self.store.put_marker(marker)
            if ended is not None:  # a crash before this leaves a stale index marker: verified away
                await self.store.delete_markers([ended])
            emit(self.plugins, "retried", task)
            return task

    async def retry_many(
        self, status: str = FAILED, task_type: str | None = None,
        since: datetime | dt.timedelta | float | None = None, *,
        progress: Callable[[int, int], Any] | None = None,
    ) -> int:
        """Retry every ``status`` task ("failed": the dead letters, "cancelled" or
        "expired") of ``task_type`` (any when None) that ended at or after ``since``;
        returns how many were retried.

        Each is found by ``list(status=...)`` and put back by :meth:`retry`, 16 at a time;
        one that changed state meanwhile (retried by someone else, say) is skipped and not
        counted. ``progress(done, listed)`` is called after each retry: retried so far,
        listed so far. Arguments are checked before anything is read (``InvalidInput``
        naming the field). Cost: the listing (one LIST per 1000 ``ended/`` entries + one
        GET per task) plus each retry (a GET, a marker PUT, the task CAS, the ``ended/``
        entry's delete: 4 requests)."""
        from .bulk import retry_many

        return await retry_many(self, status, task_type, since, progress)

    async def cancel_many(
        self, status: str = PENDING, task_type: str | None = None,
        since: datetime | dt.timedelta | float | None = None, *,
        progress: Callable[[int, int], Any] | None = None,
    ) -> int:
        """Cancel every ``status`` task ("pending" or "blocked") of ``task_type`` (any when
        None) created at or after ``since``; returns how many were changed.

        Each is found by ``list(status=...)`` and cancelled by :meth:`cancel`, 16 at a
        time, so a cancelled dependency fails (or skips, or runs) its dependents by their
        policy. ``status="running"`` asks each running task to stop (``cancel_requested``;
        it ends ``cancelled`` unless its attempt completes) and counts those asked now. A
        pending task that started meanwhile is asked to stop likewise and counted; one
        that ended meanwhile is skipped and not counted. ``progress(done, listed)`` as in
        :meth:`retry_many`; arguments are checked before anything is read. Cost: the
        listing (pending: the LISTs of ``ready/`` and ``delayed/``; blocked: of ``deps/``;
        running: the worker records; + one GET per task) plus each cancel (a GET, the
        ``ended/`` PUT, the task CAS, the markers' delete, and a LIST of its dependents'
        edges if it has any: 4-5 requests; running: a GET and the CAS)."""
        from .bulk import cancel_many

        return await cancel_many(self, status, task_type, since, progress)

    # -- lifecycle ----------------------------------------------------------------

    async def layout(self, *, refresh: bool = False) -> Layout:
        """How the queue's keys are spread over prefixes (qo/layout.py): read once, kept
        (``refresh``: read the settings object again)."""
        return await self.store.backoff.call(lambda: self.storage.get_layout(refresh=refresh))

    async def set_layout(self, shards: int) -> Layout:
        """Spread the queue's per-task keys over ``shards`` prefixes (1-256, a power of
        two), recorded in its settings object. Only before the queue's first task, and
        never changed after: ``InvalidInput`` naming ``shards`` otherwise. Set it before
        any producer or worker opens the queue (each reads the layout once)."""
        shards = check_shards(shards)
        current = await self.layout(refresh=True)
        if not current.recorded:
            first = await self.storage.first_task_key()
            if first is not None:
                raise InvalidInput("shards", f"queue {self.name!r} already holds tasks ({first}); a layout is "
                                   "set before the queue's first task (make a new queue for another)")
        layout = await self.settings.record_layout(shards)
        self.storage.learn(layout)
        return layout

    @property
    def limits(self) -> Limits:
        """Rate and concurrency limits of this queue (``queue.limits.set(...)``)."""
        return Limits(self)

    async def close(self) -> None:
        await self.storage.close()

    async def __aenter__(self) -> "Queue":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def connect(
    url: str | None = None,
    *,
    queue: str | None = None,
    options: dict[str, Any] | None = None,
    plugins: Plugins | None = None,
    clock: Clock | None = None,
    wrap_storage: Callable[[Storage], Storage] | None = None,
) -> Queue:
    """Open ``queue`` (default ``QO_QUEUE``, else ``default``) at ``url`` (default ``QO_URL``, else ``./.qo``).

    ``wrap_storage`` wraps the backend (request counting, fault injection).
    """
    url = default_url() if url is None else url
    if url_scheme(url) == "":  # a bare path: resolved once, so every message names the same place
        url = os.path.abspath(os.path.expanduser(url))
    if queue is None:
        from .config import load

        queue = load()["queue"]
    name = validate_queue_name(queue)
    plugins = plugins or get_plugins()
    storage = open_storage(url, options, plugins)
    if wrap_storage is not None:
        storage = wrap_storage(storage)
    return Queue(storage, name, plugins=plugins, clock=clock, url=url)
