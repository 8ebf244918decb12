"""Request prices and the dashboard's own request meter.

A price table maps each storage operation counted by ``qo.counting`` (``OPS``) to US
dollars per 1,000 requests. The default is S3 Standard's published request pricing
(US East, N. Virginia): PUT, COPY, POST and LIST requests $0.005 per 1,000; GET and all
other requests $0.0004 per 1,000; DELETE free. qo's operations map onto those classes:

    PUT, PUT_COND, LIST     $0.005  (a conditional PUT is billed as a PUT)
    DELETE_BATCH            $0.005  (DeleteObjects is a POST; counted at the POST price,
                                     the cautious reading)
    GET                     $0.0004
    DELETE                  $0

``parse_prices("PUT=0.005,GET=0.0004")`` overrides entries (``--prices`` or
``QO_DASHBOARD_PRICES``); ``PUT`` given alone sets ``PUT_COND`` too.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Mapping

from qo.counting import OPS

#: where the default prices come from, and the date they were last checked (against
#: secondary sources quoting that page; the page itself was not fetched here)
PRICES_SOURCE = "Amazon S3 pricing, S3 Standard, US East (N. Virginia): https://aws.amazon.com/s3/pricing/"
PRICES_AS_OF = "2026-11-29"
DEFAULT_PRICES: dict[str, float] = {
    "GET": 0.0004,
    "PUT": 0.005,
    "PUT_COND": 0.005,
    "LIST": 0.005,
    "DELETE": 0.0,
    "DELETE_BATCH": 0.005,
}
#: minutes in the month the estimate is for (30 days)
MONTH_MINUTES = 30 * 24 * 60


class PriceError(ValueError):
    """A price table that cannot be read; the message names the bad entry."""


def parse_prices(text: str | None) -> dict[str, float]:
    """The default table with the ``OP=USD_PER_1000`` entries of ``text`` (comma separated)."""
    prices = dict(DEFAULT_PRICES)
    if not text or not text.strip():
        return prices
    given: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        op, sep, value = item.partition("=")
        op = op.strip().upper()
        if not sep:
            raise PriceError(f"{item.strip()!r} is not OP=PRICE (e.g. PUT=0.005)")
        if op not in OPS:
            raise PriceError(f"{op!r} is not one of {', '.join(OPS)}")
        try:
            price = float(value)
        except ValueError:
            raise PriceError(f"{op}: {value.strip()!r} is not a number (USD per 1,000 requests)") from None
        if not 0 <= price < 1e6 or price != price:
            raise PriceError(f"{op}: {value.strip()!r} must be a price >= 0 (USD per 1,000 requests)")
        given[op] = price
    prices.update(given)
    if "PUT" in given and "PUT_COND" not in given:
        prices["PUT_COND"] = given["PUT"]
    return prices


def monthly_cost(per_minute: Mapping[str, float], prices: Mapping[str, float]) -> float:
    """USD per 30-day month at ``per_minute`` requests per minute by operation."""
    return sum(rate * MONTH_MINUTES * prices.get(op, 0.0) / 1000 for op, rate in per_minute.items())


def sum_rates(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Requests per minute by operation, summed over ``rows`` (unknown values skipped)."""
    out = {op: 0.0 for op in OPS}
    for row in rows:
        for op, rate in (row or {}).items():
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 0:
                out[op] = out.get(op, 0.0) + float(rate)
    return out


class RequestMeter:
    """A rolling window over a request counter's snapshots: requests per minute by operation.

    ``counts`` returns the counter's cumulative requests by operation (e.g. a
    ``CountingStorage``'s ``counts``); ``sample()`` records it with the time. The rate is
    the difference between the newest sample and the oldest one inside ``window``
    seconds, scaled to a minute.
    """

    def __init__(self, counts: Callable[[], Mapping[str, int]], window: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.counts, self.window, self.clock = counts, window, clock
        self.samples: deque[tuple[float, dict[str, int]]] = deque()
        self.started = clock()
        self.baseline = dict(counts())  # what the counter held before this meter
        self.sample()

    def sample(self) -> None:
        now = self.clock()
        self.samples.append((now, dict(self.counts())))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()

    def per_minute(self) -> dict[str, float]:
        """Requests per minute by operation over the window (every op in OPS present)."""
        self.sample()
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        elapsed = max(t1 - t0, 1.0)  # the first second would scale a handful up absurdly
        return {op: (c1.get(op, 0) - c0.get(op, 0)) * 60.0 / elapsed for op in OPS}

    def total(self) -> dict[str, int]:
        """Requests by operation since this meter was made."""
        current = self.counts()
        return {op: current.get(op, 0) - self.baseline.get(op, 0) for op in OPS}

    @property
    def span(self) -> float:
        """Seconds the rate is measured over (the window, or less since the start)."""
        return min(self.window, self.clock() - self.samples[0][0])
