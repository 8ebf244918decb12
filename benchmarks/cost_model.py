"""What qo's requests cost at scale on S3: requests per second, prefixes needed, USD per month.

    python benchmarks/cost_model.py [--pack-size 256] [--outcome-flushes 2.5] [--headroom 0.5]
                                    [--rates 1000,10000,100000]

Prints a Markdown table (its caption says every assumption) for two paths:

- **single**: one object per task, as qo runs today; the requests per task are the
  benchmark's measured split (benchmarks/README.md, "Where the requests go": s3, one
  worker, 1000 tasks), plus the retention pass's share;
- **bulk**: packs of K tasks in one object (designed, not built): per pack a marker PUT,
  the pack PUT, a share of a LIST, a GET, a claim CAS, a worker-record write, 2-3
  outcome CAS flushes, a share of a batch delete and a retention delete.

For each, at each rate: requests per second in all, split into writes (PUT, COPY, POST,
DELETE: S3 serves 3,500 a second per partitioned prefix) and reads (GET, HEAD, LIST:
5,500); the load on one prefix if all of a queue's keys share it (P = 1); the fewest
prefixes P that keep each under ``headroom`` of S3's limits, and their load; the monthly
request bill at S3 Standard us-east-1 prices, against SQS standard queues doing the
same work (send, receive, delete per message; or the same three calls per batch of 10).
Request charges only: no storage, transfer or compute.

docs/architecture.md ("Cost model: requests, prefixes and money at scale") holds this
script's output at its defaults; tests/test_cost_model.py checks that they agree.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Iterable

SECONDS_PER_MONTH = 30 * 86_400

#: S3 Standard, us-east-1, USD per request: PUT, COPY, POST, LIST are one class, GET and
#: the rest another; DELETE is free (DeleteObjects is a POST: PUT-class)
S3_PRICE = {"put": 0.005 / 1000, "get": 0.0004 / 1000, "free": 0.0}
#: S3's request rate per partitioned prefix: writes (PUT/COPY/POST/DELETE), reads (GET/HEAD)
S3_LIMIT = {"write": 3500, "read": 5500}
#: SQS standard queue, USD per request after the free tier (1 million requests a month)
SQS_PRICE, SQS_FREE = 0.40 / 1e6, 1e6

#: operation -> (price class, rate-limit class). A LIST is a GET on the bucket (a read)
#: billed at the PUT-class price.
OPS = {
    "PUT": ("put", "write"),
    "PUT_COND": ("put", "write"),
    "DELETE_BATCH": ("put", "write"),  # DeleteObjects: one POST for up to 1000 keys
    "DELETE": ("free", "write"),
    "LIST": ("put", "read"),
    "GET": ("get", "read"),
}

#: requests per task, one object per task (measured: bench.py, s3, 1 worker, 1000 tasks)
SINGLE = {
    "PUT": 1.0,  # the ready marker
    "PUT_COND": 3.045,  # task create, claim CAS, outcome CAS; worker-record writes 0.045
    "GET": 1.003,  # the claim's read (3 wasted in 1000)
    "LIST": 0.055 + 0.001,  # ready/ listings shared by a poll; retention's listing
    "DELETE_BATCH": 0.014 + 0.001,  # claimed markers (~70 a batch); retention's deletes
}


def bulk_per_pack(outcome_flushes: float) -> dict[str, float]:
    """Requests per pack of tasks (the bulk path, designed, not built)."""
    return {
        "PUT": 1.0,  # the pack's ready marker
        # the pack (create-only), its claim CAS, the worker-record write, the outcome flushes
        "PUT_COND": 1.0 + 1.0 + 1.0 + outcome_flushes,
        "LIST": 1.0,  # a share of the listings
        "GET": 1.0,  # the pack's read at claim
        "DELETE_BATCH": 1.0,  # a share of the claimed-marker batch deletes
        "DELETE": 1.0,  # the retention delete of the pack
    }


def per_task(counts: dict[str, float], tasks: float = 1.0) -> dict[str, float]:
    return {op: n / tasks for op, n in counts.items()}


def fewest_prefixes(writes: float, reads: float, headroom: float) -> int:
    """The fewest prefixes over which ``writes`` and ``reads`` per second, spread evenly,
    stay within ``headroom`` of S3's per-prefix limits."""
    return max(1, math.ceil(writes / (S3_LIMIT["write"] * headroom)), math.ceil(reads / (S3_LIMIT["read"] * headroom)))


def row(path: str, rate: float, ops: dict[str, float], headroom: float) -> dict[str, float | str]:
    """The figures of one path at ``rate`` tasks per second; ``ops`` is requests per task."""
    by_limit = {"write": 0.0, "read": 0.0}
    dollars_per_task = 0.0
    for op, n in ops.items():
        price, limit = OPS[op]
        by_limit[limit] += n * rate
        dollars_per_task += n * S3_PRICE[price]
    tasks_per_month = rate * SECONDS_PER_MONTH
    prefixes = fewest_prefixes(by_limit["write"], by_limit["read"], headroom)
    return {
        "path": path,
        "rate": rate,
        "per_task": sum(ops.values()),
        "requests": sum(ops.values()) * rate,
        "writes": by_limit["write"],
        "reads": by_limit["read"],
        "prefixes": prefixes,
        "shards": min(256, 2 ** math.ceil(math.log2(prefixes))),
        "s3_usd": dollars_per_task * tasks_per_month,
        "sqs_usd": max(0.0, 3 * tasks_per_month - SQS_FREE) * SQS_PRICE,
        "sqs_batched_usd": max(0.0, 0.3 * tasks_per_month - SQS_FREE) * SQS_PRICE,
    }


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _load(writes: float, reads: float) -> str:
    over = writes > S3_LIMIT["write"] or reads > S3_LIMIT["read"]
    text = f"{_n(writes)} w + {_n(reads)} r"
    return f"**{text}: over**" if over else text


def table(rates: Iterable[float] = (1_000, 10_000, 100_000), pack_size: int = 256,
          outcome_flushes: float = 2.5, headroom: float = 0.5) -> str:
    """The Markdown table, its caption first."""
    pack = bulk_per_pack(outcome_flushes)
    paths = [("single", per_task(SINGLE)), (f"bulk, K={pack_size}", per_task(pack, pack_size))]
    rows = [row(name, rate, ops, headroom) for name, ops in paths for rate in rates]
    single = " + ".join(f"{op} {n:g}" for op, n in SINGLE.items())
    bulk = " + ".join(f"{op} {n:g}" for op, n in pack.items())
    lines = [
        f"Single path, requests per task (measured, plus retention): {single} = "
        f"{sum(SINGLE.values()):.2f}. Bulk path, requests per pack of K = {pack_size} tasks "
        f"({outcome_flushes:g} outcome flushes): {bulk} = {sum(pack.values()):g}, "
        f"{sum(pack.values()) / pack_size:.3f} per task. Writes: PUT, COPY, POST (DeleteObjects), "
        f"DELETE; reads: GET, HEAD, LIST. S3 allows {S3_LIMIT['write']:,} writes and "
        f"{S3_LIMIT['read']:,} reads per second per prefix; min P keeps each under "
        f"{headroom:.0%} of that; `--shards` is the layout to set for it (`qo layout set`, "
        f"a power of two at or above min P: docs/architecture.md §5l). S3 Standard us-east-1: ${S3_PRICE['put'] * 1000:g} per 1,000 "
        f"PUT/COPY/POST/LIST, ${S3_PRICE['get'] * 1000:g} per 1,000 GET, DELETE free. SQS "
        f"standard: ${SQS_PRICE * 1e6:.2f} per million requests after 1 million free; 3 "
        "requests per message (send, receive, delete), or 3 per batch of 10. A month is "
        "30 days; request charges only.",
        "",
        "| path | tasks/s | requests/task | requests/s | one prefix (P = 1), per s | min P | `--shards` "
        "| per prefix at min P, per s | S3 USD/month | SQS USD/month | SQS, batches of 10 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        p = r["prefixes"]
        lines.append(
            f"| {r['path']} | {r['rate']:,.0f} | {r['per_task']:.3g} | {_n(r['requests'])} "
            f"| {_load(r['writes'], r['reads'])} | {p:,} | {r['shards']} | {_load(r['writes'] / p, r['reads'] / p)} "
            f"| {r['s3_usd']:,.0f} | {r['sqs_usd']:,.0f} | {r['sqs_batched_usd']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="1000,10000,100000", help="tasks per second, comma separated")
    parser.add_argument("--pack-size", type=int, default=256, help="K: tasks per pack on the bulk path")
    parser.add_argument("--outcome-flushes", type=float, default=2.5, help="outcome CAS writes per pack")
    parser.add_argument("--headroom", type=float, default=0.5, help="share of S3's per-prefix limits to use")
    args = parser.parse_args(argv)
    try:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        parser.error("--rates: numbers separated by commas")
    if not rates or any(r <= 0 for r in rates) or args.pack_size < 1 or not 0 < args.headroom <= 1:
        parser.error("--rates must be > 0, --pack-size >= 1, --headroom in (0, 1]")
    print(table(rates, args.pack_size, args.outcome_flushes, args.headroom))
    return 0


if __name__ == "__main__":
    sys.exit(main())
