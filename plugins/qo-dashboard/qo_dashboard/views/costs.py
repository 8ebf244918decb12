"""The cost meter: requests per minute by operation, for this dashboard (counted by its
own CountingStorage) and for the workers (from their heartbeat records, through
``queue.stats()``), and what a month of that costs at the price table."""

from __future__ import annotations

import time

from aiohttp import web

from ..rendering import render
from ..state import state

from qo.counting import OPS

from ..costs import DEFAULT_PRICES, PRICES_AS_OF, PRICES_SOURCE, monthly_cost, sum_rates


async def page(request: web.Request) -> web.Response:

    app = state(request)
    stats = await app["queue"].stats()
    prices = app["prices"]
    workers = []
    for w in stats["workers"]:
        rpm = w.get("requests_per_minute") if isinstance(w.get("requests_per_minute"), dict) else {}
        total = w.get("requests") if isinstance(w.get("requests"), dict) else {}
        rates = sum_rates([rpm])
        workers.append({"worker_id": w["worker_id"], "alive": w["alive"], "rpm": rates,
                        "month": monthly_cost(rates, prices),
                        "reported": bool(rpm or total), "total": sum(v for v in total.values()
                                                                      if isinstance(v, int))})
    live = [w for w in workers if w["alive"]]
    worker_rpm = sum_rates([w["rpm"] for w in live])
    meter = app["meter"]
    dash_rpm = meter.per_minute() if meter is not None else None
    dash_total = meter.total() if meter is not None else None
    rows = [{"op": op, "price": prices.get(op, 0.0),
             "dash": None if dash_rpm is None else dash_rpm[op], "workers": worker_rpm[op]} for op in OPS]
    return render(
        request, "costs.html", active="costs", rows=rows, workers=workers, live=live,
        reporting=sum(1 for w in live if w["reported"]),
        dash_month=None if dash_rpm is None else monthly_cost(dash_rpm, prices),
        worker_month=monthly_cost(worker_rpm, prices),
        dash_total=dash_total, window_s=meter.span if meter is not None else 0,
        uptime=time.time() - app["started"], source=PRICES_SOURCE, as_of=PRICES_AS_OF,
        refresh_cost=app["refresh_cost"], custom_prices=prices != DEFAULT_PRICES)
