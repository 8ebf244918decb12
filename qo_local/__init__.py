"""qo's filesystem backend: ``file://`` URLs and bare paths (development default, tests)."""

from .storage import LocalStorage

__all__ = ["LocalStorage"]
