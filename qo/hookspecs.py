"""The hook specification: the plugin reference.

Hooks decide or construct; they do not sit on the I/O hot path. A hook that needs I/O
returns an object with async methods, built once. ``firstresult`` hooks stop at the
first implementation that returns something other than ``None``; plugins registered
later are asked first, so a third-party plugin overrides a built-in default without
blocking it. An implementation may accept fewer arguments than its spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import datetime as dt

    import click

    from .model import Task
    from .storage import Storage

PROJECT = "qo"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def qo_storage(url: str, options: dict[str, Any]) -> Storage | None:
    """Build the Storage for ``url``, or return ``None`` if the scheme is not yours.

    Stops at the first non-None result. Return an object implementing
    :class:`qo.storage.Storage`; it is built once per ``qo.connect`` and closed by
    the queue. Raise :class:`qo.ConfigurationError` for a URL of your scheme that
    cannot be used (missing bucket, missing optional dependency), naming what is wrong
    and never including credentials.

    :param url: the URL as given (``s3://bucket/prefix?region=...``, ``file:///x``,
        a bare path).
    :param options: extra keyword options from the caller (may be empty).
    """


@hookspec
def qo_storage_schemes() -> list[str]:
    """The URL schemes this plugin serves, for error messages and ``qo plugins``.

    Broadcast: every plugin's list is collected. A scheme of ``""`` means bare paths.
    """


# ---------------------------------------------------------------------------
# scheduling
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def qo_next_fire(schedule: Any, after: dt.datetime) -> dt.datetime | None:
    """The next fire time of ``schedule`` strictly after ``after``, or ``None``.

    Stops at the first non-None result. The default plugin reads ``schedule.cron``
    with croniter in ``schedule.timezone``. Return a timezone-aware datetime. Return
    ``None`` when the schedule is not of a kind you understand.

    :param schedule: the schedule record (name, cron, timezone, ...).
    :param after: an aware datetime.
    """


@hookspec(firstresult=True)
def qo_retry_delay(task: Task, error: BaseException) -> float | None:
    """Seconds to wait before retrying ``task`` after ``error``.

    Stops at the first non-None result. The default is exponential backoff with
    jitter, bounded by ``task.max_retries``. To say "do not retry", return a negative
    number (``-1``): ``None`` means "no opinion" and passes to the next plugin.

    :param task: the task whose attempt ``task.attempt`` just failed.
    :param error: the exception the handler raised (``qo.Retry`` carries a delay).
    """


# ---------------------------------------------------------------------------
# priority
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def qo_effective_priority(task: Any, waited_s: float) -> int | None:
    """The priority (0-255) a due task competes with after waiting ``waited_s`` seconds.

    Stops at the first non-None result. The default ages waiting tasks upward to a cap.

    :param task: the task (or its ready-index entry: ``priority`` and ``id``).
    :param waited_s: seconds since the task became due.
    """


# ---------------------------------------------------------------------------
# rate limits
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def qo_rate_limiter(storage: Storage, config: dict[str, Any]) -> Any | None:
    """An object that grants or refuses a task's start under the configured limits.

    Stops at the first non-None result. Built once per worker; its async methods do
    the storage I/O. The default is a token bucket kept in storage by CAS.

    :param storage: the queue's storage.
    :param config: the queue's limit configuration.
    """


# ---------------------------------------------------------------------------
# dependencies
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def qo_on_dependency_failed(task: Task, dependency: Task) -> str | None:
    """What to do with ``task`` now that ``dependency`` failed or was cancelled.

    Stops at the first non-None result. Return ``"fail"``, ``"skip"`` or ``"run"``.
    The default returns the task's own ``on_dependency_failure``.

    :param task: the blocked dependent.
    :param dependency: the dependency that ended without completing.
    """


# ---------------------------------------------------------------------------
# idempotency
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def qo_idempotency_namespace(scope: str, key: str, task_type: str, queue: str) -> str | None:
    """The namespace an idempotency key lives in: the same key in two namespaces names
    two tasks.

    Stops at the first non-None result. The default maps ``task_type`` to
    ``type.<task type>``, ``queue`` to ``queue`` and ``custom:<name>`` to
    ``custom.<name>``. Return ``/``-separated segments of letters, digits, ``_ . : -``
    (e.g. ``tenant.42/type.send_email`` to scope keys per tenant).

    :param scope: the scope the caller asked for (``task_type``, ``queue``, ``custom:<name>``).
    :param key: the idempotency key.
    :param task_type: the submitted task's type.
    :param queue: the queue name.
    """


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------


@hookspec
def qo_task_event(event: str, task: Task) -> None:
    """Observe a task's lifecycle: for metrics, logs and tracing. Broadcast.

    ``event`` is one of ``submitted``, ``started``, ``succeeded``, ``failed``,
    ``retried``, ``cancelled``, ``recovered``, ``expired`` (``failed`` is final: the
    dead letter; ``retried`` is a failed attempt that will run again; ``expired``: a
    worker reached the task after its ``expires_at`` and ended it without running it,
    sent once its ``ended/`` index marker is stored). Called after the state change is
    stored. Must not block: hand slow work to a thread or a queue.
    An exception raised here is logged and does not affect the task.

    :param event: what happened.
    :param task: the task as stored after the change.
    """


# ---------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------


@hookspec
def qo_worker_started(worker: Any) -> None:
    """A worker has started: it is about to claim its first task. Broadcast.

    Called inside ``await worker.run()``, on the worker's event loop, once its record is
    written and its peers met, before the first claim; so an implementation may start
    an asyncio task of its own there (e.g. a periodic ``await worker.queue.stats()``),
    and stop it in :func:`qo_worker_stopping`. Must not block. Called again by each
    ``run()`` of the same worker. An exception raised here is logged and does not stop
    the worker.

    :param worker: the :class:`qo.Worker`: ``worker.queue`` (its ``qo.Queue``),
        ``worker.worker_id``, ``worker.settings``.
    """


@hookspec
def qo_worker_stopping(worker: Any) -> None:
    """A worker is stopping: its slots have ended (or a forced exit gave up on them). Broadcast.

    Called in ``worker.run()``'s cleanup, on the worker's event loop, before its last
    record write; always after a :func:`qo_worker_started` of the same run, whether the
    run ended on a signal, ``stop()``, idleness or an error. Stop here what was started
    there. An exception raised here is logged and does not affect the shutdown.

    :param worker: the :class:`qo.Worker` that is stopping.
    """


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


@hookspec
def qo_cli_commands(cli: click.Group) -> None:
    """Add subcommands to the ``qo`` command line. Broadcast.

    Called after the core commands are attached: ``cli.add_command(my_command)``.
    ``qo.cli.common`` is part of the plugin API for implementers: ``queue_options``
    (``--url``/``--queue`` with qo's defaults), ``run`` (an async command body; a
    ``QoError`` is one line on stderr and exit 1) and ``open_queue(url, queue_name)``.

    :param cli: the root click group.
    """
