"""Failed logins, limited per client address: a token bucket of a few tries that refills
slowly. An empty bucket answers 429 with ``Retry-After`` whatever the token (right or
wrong: guessing must not go on while it waits); a success does not refill anyone's."""

from __future__ import annotations

import ipaddress
import math
import time
from typing import Callable

from aiohttp import web

BURST = 5
PER = 10.0
#: buckets kept at most (idle ones are dropped first, then the oldest)
MAX_CLIENTS = 10_000


def client_key(remote: str | None) -> str:
    """The bucket of an address: itself for IPv4, its /64 for IPv6 (one host's share)."""
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginLimiter:
    """``burst`` failed tries per client, refilled at one every ``per`` seconds of ``clock``."""

    def __init__(self, burst: int = BURST, per: float = PER, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = MAX_CLIENTS):
        if burst < 1 or per <= 0:
            raise ValueError("burst must be at least 1 and per positive")
        self.burst, self.per, self.clock, self.max_clients = burst, float(per), clock, max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tries left, at)

    def _level(self, key: str, now: float) -> float:
        left, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), left + max(0.0, now - at) / self.per)

    def wait(self, remote: str | None) -> float:
        """Seconds before ``remote`` may try again (0.0: now)."""
        level = self._level(client_key(remote), self.clock())
        return 0.0 if level >= 1.0 else (1.0 - level) * self.per

    def failed(self, remote: str | None) -> None:
        """Count one wrong token from ``remote``."""
        key, now = client_key(remote), self.clock()
        level = self._level(key, now)
        self._buckets.pop(key, None)  # re-inserted last: the dict's order is the age
        self._buckets[key] = (max(0.0, level - 1.0), now)
        self._prune(now)

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self.max_clients:
            return
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_clients:
            del self._buckets[next(iter(self._buckets))]

    def check(self, remote: str | None) -> None:
        """Raise 429 (with Retry-After) when ``remote`` must wait before trying again."""
        wait = self.wait(remote)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise web.HTTPTooManyRequests(
                text=f"429: too many wrong tokens from this address; try again in {seconds} s\n",
                headers={"Retry-After": str(seconds)})
