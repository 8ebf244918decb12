"""Test support for qo and for plugin authors.

- :class:`ConformanceTests` / :class:`StorageFixtures`: the storage-contract suite a
  backend runs with one import (``class TestMine(StorageFixtures, ConformanceTests)``).
- :class:`MotoServer`: a moto S3 server on a free loopback port.
- :class:`SlowDown`: WSGI middleware answering S3's ``503 SlowDown`` above a request
  rate per prefix (``MotoServer(middleware=SlowDown(rate=40))``).
- :class:`FakeClock`: a clock tests move by hand.
- :class:`FaultyStorage`: a Storage wrapper injecting errors, latency, lost responses.
- :func:`stop_process`: stop a server process a test started (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ConformanceTests": ".conformance",
    "StorageFixtures": ".conformance",
    "MotoServer": ".moto",
    "SlowDown": ".slowdown",
    "FaultyStorage": ".faults",
    "FakeClock": "qo.clock",
    "stop_process": ".processes",
}


def __getattr__(name: str) -> Any:  # lazy: importing qo.testing must not start anything
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
