"""The server clock's offset from the local one, from the ``Date`` header of responses.

The same estimate as qo's S3 backend: the header has 1-second resolution, so one
response sent at ``t0`` and received at ``t1`` with ``Date: D`` bounds the offset
(server minus local) to ``D - t1 <= offset < D + 1 - t0``. The estimator keeps the
intersection of these intervals (widened by 100 ppm of elapsed time for drift) and
reports its midpoint; an interval that contradicts it (the server clock jumped, or
another front end answered) restarts it. Within ``latency/2 + 0.5 s`` after one
response, it tightens to about the round-trip time, and one slow response cannot pull
it off.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime

__all__ = ["OffsetEstimator"]

MAX_DRIFT = 1e-4  # clocks drift apart by at most ~100 ppm


class OffsetEstimator:
    """Server-minus-local clock offset in seconds (``offset``), refined per response."""

    def __init__(self) -> None:
        self.offset: float = 0.0
        self.bounds: tuple[float, float, float] | None = None  # (low, high, local time)

    def observe(self, date_header: str | None, t0: float, t1: float) -> None:
        """Tighten the estimate with a response's ``Date`` header (ignored if absent)."""
        if not date_header:
            return
        try:
            server = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        low, high = server - t1, server + 1.0 - t0
        if self.bounds is not None:
            old_low, old_high, at = self.bounds
            slack = MAX_DRIFT * max(0.0, t1 - at)
            low, high = max(low, old_low - slack), min(high, old_high + slack)
            if low > high:  # contradiction: the server clock moved; start over
                low, high = server - t1, server + 1.0 - t0
        self.bounds = (low, high, t1)
        self.offset = (low + high) / 2
