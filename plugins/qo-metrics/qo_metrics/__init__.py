"""qo-metrics: Prometheus metrics for qo task events, served by ``qo worker --metrics-port``."""

from .collectors import METRICS, Metrics, serve

__all__ = ["METRICS", "Metrics", "serve"]
__version__ = "0.1.0"
