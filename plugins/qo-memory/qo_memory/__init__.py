"""qo-memory: a ``memory://NAME`` storage backend whose data lives in this process."""

from .storage import MemoryStorage, forget

__all__ = ["MemoryStorage", "forget"]
__version__ = "0.1.0"
