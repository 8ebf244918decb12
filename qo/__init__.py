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
    StorageError,
    StorageUnavailable,
    TaskNotFound,
    TaskStateError,
)
from .handlers import handler
from .hookspecs import hookimpl
from .model import Task
from .queue import Queue, connect
from .sync import SyncQueue, connect_sync
from .task_function import TaskFunction, task
from .worker import TaskContext, Worker, WorkerSettings
from .storage import Blob, Entry, Storage

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
    "Retry",
    "ScheduleNotFound",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "SyncQueue",
    "TaskNotFound",
    "TaskStateError",
    "Task",
    "TaskContext",
    "TaskFunction",
    "Worker",
    "WorkerSettings",
    "handler",
    "connect",
    "connect_sync",
    "task",
    "hookimpl",
]
