"""``@qo.task``: a handler that knows how to submit itself, with its own defaults.

    @qo.task("send_email", queue="emails", priority="high", max_retries=5)
    async def send_email(input, ctx): ...

    await send_email.submit({"to": "a@example.com"})           # from async code
    send_email.submit_sync({"to": "a@example.com"}, priority=9)  # from Flask, Django, scripts
    send_email.delay({"to": "a@example.com"})                    # the same, by Celery's name
    await send_email({"to": "a@example.com"}, ctx)              # a plain call still just runs it

The handler is registered like ``@qo.handler`` (a worker importing the module runs it).
Without ``using=``, both submits go through one connection per (url, queue) for the
process (:func:`qo.sync.shared_queue`), closed at exit; ``using=`` takes a ``Queue`` or
a ``SyncQueue`` of your own.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from .errors import InvalidInput
from .handlers import default_registry
from .model import Task, check_task_type
from .queue import SUBMIT_OPTIONS, Queue, validate_queue_name

__all__ = ["TaskFunction", "task"]


class TaskFunction:
    """A handler plus its submit defaults; calling it calls the handler."""

    def __init__(self, fn: Callable[..., Any], task_type: str, queue: str | None, url: str | None,
                 defaults: dict[str, Any]):
        self.fn = fn
        self.task_type = task_type
        self.queue = queue
        self.url = url
        self.defaults = defaults
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        where = f" on queue {self.queue!r}" if self.queue else ""
        return f"<qo task {self.task_type!r}{where}: {self.fn.__module__}.{self.fn.__qualname__}>"

    def options(self, overrides: dict[str, Any], where: str = "submit") -> dict[str, Any]:
        """The decorator's defaults with ``overrides`` on top (names checked)."""
        _check_option_names(overrides, where, task=True)
        return {**self.defaults, **overrides}

    async def submit(self, input: Any = None, *, using: Any = None, **overrides: Any) -> Task:
        """Submit one task of this type (``overrides``: :meth:`qo.Queue.submit`'s options)."""
        options = self.options(overrides)
        if using is None:
            from .sync import shared_queue

            shared = shared_queue(self.url, self.queue)
            return await shared._runner.submit(lambda: shared.async_queue.submit(self.task_type, input, **options))
        if isinstance(using, Queue):
            return await using.submit(self.task_type, input, **options)
        raise InvalidInput("using", f"must be a qo.Queue in async code, not {type(using).__name__}")

    def submit_sync(self, input: Any = None, *, using: Any = None, **overrides: Any) -> Task:
        """Submit one task of this type, blocking (for code without an event loop)."""
        return self._submit_sync(input, using, overrides, "submit_sync")

    def delay(self, input: Any = None, *, using: Any = None, **overrides: Any) -> Task:
        """``submit_sync`` by its Celery name: ``send_email.delay({"to": ...})``. The task's
        input is one JSON value: ``delay(a=1)`` is refused, naming ``input``."""
        return self._submit_sync(input, using, overrides, "delay")

    def _submit_sync(self, input: Any, using: Any, overrides: dict[str, Any], where: str) -> Task:
        from .sync import SyncQueue, shared_queue

        options = self.options(overrides, where)
        if using is None:
            using = shared_queue(self.url, self.queue)
        if not isinstance(using, SyncQueue):
            raise InvalidInput("using", f"must be a qo.SyncQueue in sync code, not {type(using).__name__}")
        return using.submit(self.task_type, input, **options)


def _check_option_names(options: dict[str, Any], where: str, *, task: bool = False) -> None:
    unknown = sorted(set(options) - set(SUBMIT_OPTIONS))
    if not unknown:
        return
    if task:  # Celery's habit, f.delay(a=1, b=2): the input is one value, given as input=
        given = ", ".join(f"{k}=..." for k in unknown)
        raise InvalidInput("input", f"{where}({given}): {', '.join(unknown)} "
                           f"{'is not an option' if len(unknown) == 1 else 'are not options'} of {where}. "
                           f"A task's input is one JSON value: pass it as input, e.g. "
                           f"{where}({{{', '.join(repr(k) + ': ...' for k in unknown)}}}) "
                           f"(options: {', '.join(SUBMIT_OPTIONS)})")
    raise InvalidInput(unknown[0], f"is not an option of {where} (options: {', '.join(SUBMIT_OPTIONS)})")


def task(task_type: str | Callable[..., Any] | None = None, *, queue: str | None = None, url: str | None = None,
         **defaults: Any) -> Any:
    """Decorator: register the function as the handler of ``task_type`` (default: its
    name) and give it ``submit``/``submit_sync`` with these defaults. ``queue`` and
    ``url`` say where it submits (default: ``QO_QUEUE``/``QO_URL`` as ``qo.connect``);
    ``defaults`` are :meth:`qo.Queue.submit`'s options (``priority="high"``, ...)."""
    if queue is not None:
        validate_queue_name(queue)
    _check_option_names(defaults, "@qo.task")

    def deco(fn: Callable[..., Any]) -> TaskFunction:
        name = check_task_type(task_type if isinstance(task_type, str) else fn.__name__)
        default_registry.add(name, fn)
        return TaskFunction(fn, name, queue, url, defaults)

    if callable(task_type):  # used bare: @qo.task
        return deco(task_type)
    return deco
