"""What a handler gets besides its input: ``TaskContext``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from .model import Task
from .queue import Queue

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker


@attrs.define
class TaskContext:
    """What a handler gets besides its input."""

    task: Task
    queue: Queue
    worker: "Worker"
    deadline: float
    #: each dependency's {"status", "output", "task_type"}, by task id
    dependencies: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def attempt(self) -> int:
        return self.task.attempt

    def extend_lease(self, seconds: float) -> None:
        """Let this attempt run ``seconds`` longer than its ``timeout_seconds``
        (the lease itself is renewed by the worker's heartbeat while it runs)."""
        self.deadline = max(self.deadline, self.queue.clock.now() + float(seconds))
