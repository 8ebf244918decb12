"""A moto S3 server on loopback with a fixed latency per request, for benchmarks.

    python benchmarks/s3_server.py [--port 0] [--latency-ms 25] [--bucket qo-bench]
                                   [--slowdown-rate N [--slowdown-depth 2]]

Prints one JSON line ``{"port": ..., "endpoint_url": ..., "bucket": ...}`` once the
bucket exists and the server is serving, then serves until killed. Every request waits
``--latency-ms`` (in its own server thread, so concurrent requests overlap), like a real
S3 round trip of ~25 ms. Writes reach moto one at a time: moto's conditional PUT is
check-then-write, not atomic under a threaded server (S3's is). ``GET /__stats`` returns the requests counted so far by kind
(GET, PUT, PUT_COND, LIST, DELETE, DELETE_BATCH, ...); ``GET /__partitions`` the throttle's
requests, SlowDowns and peak per partition prefix; ``POST /__stats`` returns them
and resets. The server-side counts cross-check the client-side CountingStorage.

``--slowdown-rate N`` throttles as S3 does (``qo.testing.slowdown.SlowDown``): at most N
requests per second (sliding 1 s window) per partition prefix, the key up to and
including its ``--slowdown-depth``-th ``/`` (2: ``{queue}/{kind}/`` for a bucket without
a prefix); above it, ``503 SlowDown`` after the latency. A refused request still counts
under its kind (the client counts it too); ``SLOWDOWN`` in the counts says how many were
refused.

Same logic as /work/shared/bench/s3_counting_server.py, kept here so that the benchmark
needs nothing outside the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable


def classify(environ: dict[str, Any]) -> str:
    """The request kind, named as CountingStorage names operations."""
    method = environ["REQUEST_METHOD"]
    qs = environ.get("QUERY_STRING", "")
    path = environ.get("PATH_INFO", "")
    if method == "GET" and ("list-type" in qs or "prefix=" in qs or path.rstrip("/").count("/") <= 1):
        return "LIST"
    if method == "GET":
        return "GET"
    if method == "PUT" and ("HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ):
        return "PUT_COND"
    if method == "PUT":
        return "PUT"
    if method == "DELETE":
        return "DELETE"
    if method == "POST" and "delete" in qs:
        return "DELETE_BATCH"
    return method


def make_app(latency_s: float, slowdown_rate: float | None = None,
             slowdown_depth: int = 2) -> tuple[Callable, Counter, threading.Lock]:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from qo.testing.slowdown import SlowDown

    moto_app = DomainDispatcherApplication(create_backend_app)
    throttle = SlowDown(slowdown_rate, depth=slowdown_depth) if slowdown_rate else None
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    writes = threading.Lock()

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/__partitions"):  # the throttle's view, by prefix
            body = json.dumps(throttle.stats()["partitions"] if throttle is not None else {}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if environ.get("PATH_INFO", "").startswith("/__stats"):
            with lock:
                body = json.dumps(dict(counts)).encode()
                if environ["REQUEST_METHOD"] == "POST":
                    counts.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        with lock:
            counts[classify(environ)] += 1
        if latency_s:
            time.sleep(latency_s)
        if throttle is not None and not throttle.admit(throttle.partition(environ)):
            with lock:
                counts["SLOWDOWN"] += 1
            return throttle.refuse(environ, start_response)

        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            # werkzeug sends its own Server header; aiohttp's strict parser rejects two
            return start_response(status, [h for h in headers if h[0].lower() != "server"], *exc_info)

        if environ["REQUEST_METHOD"] in ("GET", "HEAD") and classify(environ) != "LIST":
            return moto_app(environ, start)
        # moto checks If-Match / If-None-Match, then writes, in two steps: two threads
        # can interleave and both win a CAS. S3 is atomic here, so writes go one at a
        # time (as in qo.testing.moto); the latency above is still concurrent. A LIST
        # goes with them: moto's listing walks the bucket's keys and fails (KeyError, a
        # 500) when a delete lands in the middle.
        with writes:
            return list(moto_app(environ, start))

    return app, counts, lock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--latency-ms", type=float, default=25.0)
    parser.add_argument("--bucket", default="qo-bench")
    parser.add_argument("--slowdown-rate", type=float, default=None,
                        help="503 SlowDown above N requests/s per partition prefix (default: never)")
    parser.add_argument("--slowdown-depth", type=int, default=2,
                        help="a partition prefix is the key up to its Nth '/' (default 2: {queue}/{kind}/)")
    args = parser.parse_args(argv)
    if args.slowdown_rate is not None and args.slowdown_rate <= 0:
        parser.error("--slowdown-rate must be > 0")
    if args.slowdown_depth < 0:
        parser.error("--slowdown-depth must be >= 0")

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app, counts, lock = make_app(args.latency_ms / 1000, args.slowdown_rate, args.slowdown_depth)
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=args.bucket)
    client.close()
    with lock:
        counts.clear()
    print(json.dumps({"port": server.server_port, "endpoint_url": endpoint, "bucket": args.bucket}), flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        sys.exit(0)


if __name__ == "__main__":
    main()
