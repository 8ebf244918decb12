"""Handler registries: ``@worker.handler(type)`` and the module-level ``@qo.handler``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import attrs

from .errors import ConfigurationError, InvalidInput, QoError
from .model import check_task_type


@attrs.frozen
class Handler:
    task_type: str
    fn: Callable[..., Any]
    is_async: bool
    wants_ctx: bool

    @classmethod
    def wrap(cls, task_type: str, fn: Callable[..., Any]) -> "Handler":
        if not callable(fn):
            raise InvalidInput("handler", f"{fn!r} is not callable")
        try:
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        except (TypeError, ValueError):
            params = []
        wants_ctx = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        return cls(check_task_type(task_type), fn, inspect.iscoroutinefunction(fn), wants_ctx)


class Registry:
    """Task type -> handler. A type registered twice is an error, not a silent override."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add(self, task_type: str, fn: Callable[..., Any]) -> Handler:
        h = Handler.wrap(task_type, fn)
        if task_type in self.handlers and self.handlers[task_type].fn is not fn:
            raise InvalidInput("task_type", f"a handler for {task_type!r} is already registered")
        self.handlers[task_type] = h
        return h

    def handler(self, task_type: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: ``@registry.handler("send_email")``; default type is the function name."""

        def deco(fn: Callable) -> Callable:
            self.add(task_type or fn.__name__, fn)
            return fn

        if callable(task_type):  # used bare: @handler
            fn, task_type = task_type, None
            return deco(fn)
        return deco


class HandlerHost:
    """``handler``, ``add_handlers`` and ``handles`` over ``self.registry``: what a worker
    (of one queue or several) offers for registering handlers."""

    registry: Registry

    def handler(self, task_type: str | Callable | None = None) -> Callable:
        """Decorator registering an async or plain function for ``task_type``."""
        return self.registry.handler(task_type)

    def add_handlers(self, registry: Registry) -> None:
        for h in registry.handlers.values():
            self.registry.add(h.task_type, h.fn)

    def handles(self, task_type: str) -> bool:
        return task_type in self.registry.handlers


#: Handlers declared with ``@qo.handler`` in any imported module.
default_registry = Registry()
handler = default_registry.handler


def import_handlers(module_names: list[str]) -> Registry:
    """Import modules (dotted names or ``path/to/file.py``) and collect their handlers:
    the ``@qo.handler`` registry plus every ``qo.Worker`` defined at module level (found
    by the handler ``Registry`` it carries, so this module need not import the worker)."""
    import runpy
    import sys

    out = Registry()
    for name in module_names:
        try:
            if name.endswith(".py"):
                namespace = runpy.run_path(name)
            else:
                if "" not in sys.path:
                    sys.path.insert(0, "")
                namespace = vars(importlib.import_module(name))
        except QoError:
            raise
        except Exception as exc:  # one line naming the module, the error and where it was raised
            raise ConfigurationError(f"cannot import handlers from {name}: {type(exc).__name__}: {exc}"
                                     f"{_where(exc)}") from exc
        for value in namespace.values():
            # getattr_static: a lazy object's __getattr__ (Django's settings) is not run
            if isinstance(inspect.getattr_static(value, "registry", None), Registry):
                for h in value.registry.handlers.values():
                    out.add(h.task_type, h.fn)
    for h in default_registry.handlers.values():
        out.add(h.task_type, h.fn)
    return out


def _where(exc: BaseException) -> str:
    """`` (at file.py:12)``: the last frame the error passed through, or nothing."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""

