"""What a handler gets besides its input: ``TaskContext``."""

from __future__ import annotations

from typing import Any

import attrs

from .errors import Cancelled
from .model import Task
from .queue import Queue


@attrs.define
class TaskContext:
    """What a handler gets besides its input."""

    task: Task
    queue: Queue
    #: the ``qo.Worker`` running the task (not imported here: the worker imports this module)
    worker: Any
    deadline: float
    #: each dependency's {"status", "output", "task_type"}, by task id; an output too large
    #: to hand inline has "output": None, "output_ref": the id and "output_bytes": its
    #: size, and is read with ``dependency_output`` (``qo/dependencies.py``, ``results``)
    dependencies: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: True once someone ran ``qo cancel`` on this task (``queue.cancel``): learned with
    #: the worker's heartbeat, at no extra request. A handler that checks it stops early
    #: (``raise_if_cancelled``); the task then ends ``cancelled``, not retried.
    cancel_requested: bool = False
    _lease_lost: bool = attrs.field(default=False, init=False)

    @property
    def lease_lost(self) -> bool:
        """True once the worker learned that this attempt's lease was lost: recovery took
        the task over (this worker was presumed dead, e.g. through a storage outage), so
        it may run again elsewhere and this attempt's outcome will not be written. Learned
        when the worker's record write finds the record taken over, or a heartbeat lands
        after the lease had run out and the task says so (no I/O here): a long handler can
        poll it and stop early."""
        return self._lease_lost

    def note_lease_lost(self) -> None:
        """Called by the worker when it learns the lease was lost (``lease_lost``)."""
        self._lease_lost = True

    def raise_if_cancelled(self) -> None:
        """Raise ``qo.Cancelled`` if this task's cancel was requested (a cheap check: no I/O)."""
        if self.cancel_requested:
            raise Cancelled(f"task {self.task.id}: cancel requested")

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def attempt(self) -> int:
        return self.task.attempt

    async def dependency_output(self, task_id: str) -> Any:
        """The output of dependency ``task_id``, read from its task now: how a handler gets
        an output that ``dependencies`` hands by reference (``"output_ref"``), one at a
        time, so only the outputs it needs are in memory. Works for inline ones too.
        ``InvalidInput`` naming ``task_id`` if it is not one of this task's dependencies."""
        return await self.queue.dependencies.output(self.task, task_id)

    def extend_lease(self, seconds: float) -> None:
        """Let this attempt run ``seconds`` longer than its ``timeout_seconds``
        (the lease itself is renewed by the worker's heartbeat while it runs)."""
        self.deadline = max(self.deadline, self.queue.clock.now() + float(seconds))
