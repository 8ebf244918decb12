"""Throughput over the last hour, for the overview's chart.

- completed: ``completed`` has no index (the happy path writes none), so the dashboard
  keeps it in memory from successive ``stats()`` snapshots: the growth of each live
  worker's ``completed`` counter between two refreshes, credited to the minute of the
  refresh. It covers the time the dashboard has been open (the page says since when).
- failed: ``queue.ended_times("failed", since=an hour ago)``, from the ended index,
  newest first: one LIST of at most 1000 keys per refresh; each key carries its end
  time, so this half of the chart is right from the first refresh.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

MINUTES = 60
#: what one ``queue.ended_times`` call returns at most (documented there)
ENDED_TIMES_LIMIT = 1000


class Throughput:
    """Completed tasks per minute, from the workers' counters across stats() snapshots."""

    def __init__(self) -> None:
        self.last: dict[str, int] | None = None
        self.last_at: float | None = None
        self.first_at: float | None = None
        self.completed: Counter[int] = Counter()  # minute (epoch // 60) -> tasks

    def observe(self, stats: dict[str, Any]) -> None:
        now = float(stats["at"])
        seen: dict[str, int] = {}
        gained = 0
        for w in stats.get("workers", []):
            done = w.get("completed")
            if not isinstance(done, int) or isinstance(done, bool):
                continue
            seen[w["worker_id"]] = done
            if self.last is None:
                continue
            before = self.last.get(w["worker_id"])
            if before is None:
                started = w.get("started_at")
                # a worker that started since the last snapshot: all of its count is new
                if isinstance(started, (int, float)) and self.last_at is not None and started >= self.last_at:
                    gained += done
            else:
                gained += max(0, done - before)
        if self.first_at is None:
            self.first_at = now
        if gained:
            self.completed[int(now // 60)] += gained
        self.last, self.last_at = seen, now
        cutoff = int(now // 60) - MINUTES
        for minute in [m for m in self.completed if m <= cutoff]:
            del self.completed[minute]


async def failures(queue: Any, now: float) -> tuple[Counter[int], bool]:
    """Failed tasks per minute over the last hour from ``queue.ended_times`` (one LIST);
    and whether that is all of them (False: 1000 or more failed within the hour)."""
    out: Counter[int] = Counter()
    times = await queue.ended_times("failed", since=now - MINUTES * 60)
    for ended_at, _task_id, _task_type in times:
        out[int(ended_at // 60)] += 1
    return out, len(times) < ENDED_TIMES_LIMIT


def chart(completed: Counter[int], failed: Counter[int], now: float, *, width: int = 720,
          height: int = 120) -> dict[str, Any]:
    """Bars of the last 60 minutes (oldest left), as numbers the template draws in SVG."""
    last = int(now // 60)
    minutes = list(range(last - MINUTES + 1, last + 1))
    peak = max([completed.get(m, 0) + failed.get(m, 0) for m in minutes] + [1])
    step = width / MINUTES
    bars = []
    for i, m in enumerate(minutes):
        c, f = completed.get(m, 0), failed.get(m, 0)
        hc, hf = c / peak * (height - 4), f / peak * (height - 4)
        bars.append({"x": round(i * step + 1, 1), "w": round(step - 2, 1),
                     "yc": round(height - hc, 1), "hc": round(hc, 1),
                     "yf": round(height - hc - hf, 1), "hf": round(hf, 1),
                     "minute": m * 60, "completed": c, "failed": f})
    return {"bars": bars, "width": width, "height": height, "peak": peak,
            "completed": sum(completed.get(m, 0) for m in minutes), "failed": sum(failed.get(m, 0) for m in minutes)}
