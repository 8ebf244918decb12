"""Every error qo raises on purpose: one hierarchy under :class:`QoError`."""

from __future__ import annotations


class QoError(Exception):
    """Base of every error qo raises on purpose."""


class InvalidInput(QoError, ValueError):
    """A bad argument, named by ``field``; raised before anything is written."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class TaskNotFound(QoError, LookupError):
    """No task with this id in this queue."""

    def __init__(self, task_id: str, why: str = ""):
        self.task_id = task_id
        super().__init__(f"task {task_id!r} not found" + (f": {why}" if why else ""))


class ScheduleNotFound(QoError, LookupError):
    """No schedule with this name in this queue."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"schedule {name!r} not found")


class TaskStateError(QoError):
    """The operation does not apply to the task in its current state."""


class IdempotencyConflict(QoError):
    """The idempotency key already names a task with a different input or type."""


class DependencyError(QoError):
    """An unknown dependency id, a cycle, or a dangling name in a graph."""


class PluginError(QoError):
    """A plugin could not be loaded or answered a hook wrongly."""


class ConfigurationError(QoError):
    """The configuration (URL, environment, settings) cannot be used."""


class StorageError(QoError):
    """A storage call failed; names the backend and the key (never credentials)."""

    def __init__(self, message: str = "", *, backend: str = "", key: str | None = None):
        self.backend = backend
        self.key = key
        where = ", ".join(p for p in (backend, f"key {key!r}" if key is not None else "") if p)
        super().__init__(f"{message} ({where})" if where else message)


class NotFound(StorageError, KeyError):
    """The key does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return StorageError.__str__(self)


class PreconditionFailed(StorageError):
    """A conditional write lost: the key exists (create-only) or changed (CAS).

    Never retried blindly: the caller re-reads and decides.
    """


class CorruptObject(StorageError):
    """A stored object qo cannot use: not JSON, the wrong shape, a field of the wrong
    type, a task whose id is not its key's. It costs only itself: whoever meets it
    skips it, and ``qo doctor --scan`` lists it (``qo/stored.py``)."""

    def __init__(self, key: str, reason: str, *, backend: str = "", newer: bool = False):
        self.reason = reason
        #: the object says a newer release wrote it: skip it, never delete what points to it
        self.newer = newer
        super().__init__(f"unreadable object: {reason}", backend=backend, key=key)


class StorageUnavailable(StorageError):
    """A transient failure (5xx, throttling, timeout, connection): retry with backoff.

    The write may or may not have landed; the engine re-reads to find out.
    """


class Throttled(StorageUnavailable):
    """The store asked us to slow down (S3 ``503 SlowDown``, Azure ``ServerBusy``, any
    429): transient, like every ``StorageUnavailable``, but retried from a longer wait
    (``qo.store.Backoff``), so many clients spread out instead of hammering a prefix."""


class StorageBusy(StorageUnavailable):
    """Another client holds the store (SQLite's write lock held by another connection)
    and the backend waited for it as long as it was told to (``busy_timeout``): that wait
    was the retry, so the engine does not retry it again within the operation (a lock
    never released would cost the timeout once per try). Transient: the next operation
    tries again."""


class Retry(Exception):
    """Raised by a handler: try again after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, delay: float | None = None, message: str = ""):
        self.delay = delay
        super().__init__(message or (f"retry requested in {delay}s" if delay is not None else "retry requested"))


class Cancelled(Exception):
    """Raised by ``ctx.raise_if_cancelled()`` when the task's cancel was requested
    (``qo cancel ID``): the attempt ends and the task ends ``cancelled``."""


class Fail(Exception):
    """Raised by a handler: fail now, no retry; the task goes to the dead letter."""
