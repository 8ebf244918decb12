"""The price table and the request meter (no storage)."""

from __future__ import annotations

import pytest

from qo.counting import OPS
from qo_dashboard.costs import (DEFAULT_PRICES, MONTH_MINUTES, PriceError, RequestMeter, monthly_cost,
                                parse_prices, sum_rates)


def test_default_prices_are_s3_standard():
    assert DEFAULT_PRICES == {"GET": 0.0004, "PUT": 0.005, "PUT_COND": 0.005, "LIST": 0.005, "DELETE": 0.0,
                              "DELETE_BATCH": 0.005}
    assert set(DEFAULT_PRICES) == set(OPS)


def test_parse_overrides_and_put_sets_conditional_put():
    prices = parse_prices("put=0.01, GET=0.001")
    assert prices["PUT"] == prices["PUT_COND"] == 0.01 and prices["GET"] == 0.001 and prices["LIST"] == 0.005
    assert parse_prices("PUT=0.01,PUT_COND=0.02")["PUT_COND"] == 0.02
    assert parse_prices("") == parse_prices(None) == DEFAULT_PRICES


@pytest.mark.parametrize("text, names", [
    ("HEAD=0.1", "'HEAD' is not one of"), ("PUT", "not OP=PRICE"), ("GET=cheap", "GET: 'cheap' is not a number"),
    ("GET=-1", "must be a price >= 0"), ("GET=nan", "must be a price"),
])
def test_parse_errors_name_the_entry(text, names):
    with pytest.raises(PriceError, match=names):
        parse_prices(text)


def test_monthly_cost():
    # one PUT a second for a month: 2,592,000 PUTs at $0.005 per 1,000 = $12.96
    assert monthly_cost({"PUT": 60.0}, DEFAULT_PRICES) == pytest.approx(12.96)
    assert monthly_cost({"DELETE": 1e6}, DEFAULT_PRICES) == 0
    assert monthly_cost({"GET": 1000.0}, DEFAULT_PRICES) == pytest.approx(1000 * MONTH_MINUTES * 0.0004 / 1000)


def test_sum_rates_skips_junk():
    rows = [{"GET": 1.5, "LIST": 2}, {"GET": 0.5, "PUT": "x", "LIST": -3, "DELETE": True}, {}]
    out = sum_rates(rows)
    assert out["GET"] == 2.0 and out["LIST"] == 2.0 and out["PUT"] == 0.0 and out["DELETE"] == 0.0


def test_meter_rolling_window():
    t = [0.0]
    counts = {"GET": 0, "LIST": 0}
    meter = RequestMeter(lambda: counts, window=60.0, clock=lambda: t[0])
    t[0], counts["GET"] = 30.0, 30
    assert meter.per_minute()["GET"] == pytest.approx(60.0)
    t[0], counts["GET"], counts["LIST"] = 120.0, 30, 10  # GETs stopped 90 s ago
    rates = meter.per_minute()
    assert rates["GET"] < 30 and rates["LIST"] > 0
    t[0] = 400.0
    meter.sample()
    assert meter.per_minute()["GET"] == 0.0  # the window has moved past every GET
    assert meter.total() == {"GET": 30, "PUT": 0, "PUT_COND": 0, "LIST": 10, "DELETE": 0, "DELETE_BATCH": 0}
