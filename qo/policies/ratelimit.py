"""Default rate limiter: token buckets and running sets in storage, by CAS."""

from __future__ import annotations

from qo.hookspecs import hookimpl


@hookimpl
def qo_rate_limiter(storage, config):
    from qo.ratelimit import TokenBucketLimiter

    return TokenBucketLimiter(config["queue"], lease_ttl=config.get("lease_ttl", 30.0),
                              refresh_interval=config.get("refresh_interval", 5.0))
