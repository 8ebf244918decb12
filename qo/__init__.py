"""qo: a distributed task queue that needs nothing but a bucket."""

from .errors import (
    Cancelled,
    ConfigurationError,
    CorruptObject,
    DependencyError,
    Fail,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    PluginError,
    PreconditionFailed,
    QoError,
    Retry,
    ScheduleNotFound,
    StorageBusy,
    StorageError,
    StorageUnavailable,
    TaskNotFound,
    TaskStateError,
    Throttled,
)
from .handlers import handler
from .hookspecs import hookimpl
from . import counting
from .durations import parse_duration
from .model import STATUSES, Task, check_task_id, check_task_type
from .pages import TaskPage
from .queue import BulkSubmitError, Queue, connect
from .sync import SyncQueue, connect_sync
from .task_function import TaskFunction, task
from .worker import TaskContext, Worker, WorkerSettings
from .storage import Blob, Entry, Storage
from .urls import redact_url

__version__ = "0.1.0"

__all__ = [
    "Blob",
    "Cancelled",
    "ConfigurationError",
    "CorruptObject",
    "DependencyError",
    "Entry",
    "Fail",
    "IdempotencyConflict",
    "InvalidInput",
    "NotFound",
    "PluginError",
    "PreconditionFailed",
    "QoError",
    "Queue",
    "BulkSubmitError",
    "Retry",
    "ScheduleNotFound",
    "STATUSES",
    "Storage",
    "StorageError",
    "StorageBusy",
    "StorageUnavailable",
    "SyncQueue",
    "TaskNotFound",
    "TaskStateError",
    "Throttled",
    "Task",
    "TaskContext",
    "TaskFunction",
    "TaskPage",
    "Worker",
    "WorkerSettings",
    "handler",
    "connect",
    "connect_sync",
    "task",
    "hookimpl",
    "check_task_id",
    "check_task_type",
    "counting",
    "parse_duration",
    "redact_url",
]
