"""qo-fairshare: a priority policy under which favoured task types age faster."""

from .plugin import FairShareSettings, fair_priority, qo_effective_priority, qo_worker_started

__all__ = ["FairShareSettings", "fair_priority", "qo_effective_priority", "qo_worker_started"]
__version__ = "0.1.0"
