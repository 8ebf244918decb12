"""A moto S3 server on a free loopback port, for tests and for trying qo without AWS.

``MotoServer(ignore_conditions=True)`` simulates an S3-compatible store that has no
conditional writes: ``If-Match`` / ``If-None-Match`` are stripped from every request
before moto sees them, so ``qo doctor`` can be tested against such a store.

moto keeps its state per process: two servers in one process share buckets and objects.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Callable, Iterable
from urllib.parse import quote

from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

__all__ = ["MotoServer"]

_CONDITION_HEADERS = ("HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH")
_WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def _strip_conditions(app: _WSGIApp) -> _WSGIApp:
    """WSGI middleware that drops conditional-request headers (a store without CAS)."""

    def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        for name in _CONDITION_HEADERS:
            environ.pop(name, None)
        return app(environ, start_response)

    return wrapped


def _no_app_server_header(app: _WSGIApp) -> _WSGIApp:
    """WSGI middleware that drops moto's ``Server`` header: werkzeug always sends its own,
    and aiohttp's strict parser (e.g. under ``python -X dev``) rejects two."""

    def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            return start_response(status, [h for h in headers if h[0].lower() != "server"], *exc_info)

        return app(environ, start)

    return wrapped


def _atomic_writes(app: _WSGIApp) -> _WSGIApp:
    """WSGI middleware that runs writes one at a time.

    moto checks If-Match / If-None-Match and then writes in two steps; under a threaded
    server two conditional writes can interleave between them and both succeed (seen
    as a lost update in the CAS race test). Real S3 is atomic here; so must be the
    server we prove qo against. Reads stay concurrent.
    """
    lock = threading.Lock()

    def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return app(environ, start_response)
        with lock:
            return list(app(environ, start_response))

    return wrapped


class _Server(ThreadedMotoServer):
    """ThreadedMotoServer with an optional WSGI wrapper around moto's app."""

    def __init__(self, wrap: Callable[[_WSGIApp], _WSGIApp] | None):
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self._wrap = wrap

    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )

        app = _atomic_writes(_no_app_server_header(DomainDispatcherApplication(create_backend_app)))
        if self._wrap is not None:
            app = self._wrap(app)
        self._server = make_server(
            self._ip_address, self._port, app, threaded=True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class MotoServer:
    """A moto S3 server on ``127.0.0.1`` (free port) with one bucket created at start."""

    def __init__(self, bucket: str = "qo-test", ignore_conditions: bool = False):
        self.bucket = bucket
        self.ignore_conditions = ignore_conditions
        self._server: _Server | None = None
        self._port: int | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self._port is None:
            raise RuntimeError("MotoServer is not started")
        return f"http://127.0.0.1:{self._port}"

    def url(self, prefix: str = "", *, bucket: str | None = None) -> str:
        """A qo storage URL for ``prefix`` in this server's bucket (or ``bucket``)."""
        endpoint = quote(self.endpoint_url, safe="")
        return f"s3://{bucket or self.bucket}/{prefix}?endpoint_url={endpoint}&region=us-east-1"

    def new_bucket(self, prefix: str = "") -> str:
        """Create a fresh, uniquely named bucket and return its URL.

        moto lists a bucket by scanning every key in it, so tests that share one
        bucket get slower as the run goes on; a bucket per test keeps LIST cheap.
        """
        name = f"qo-{uuid.uuid4().hex[:20]}"
        self._create_bucket(name)
        return self.url(prefix, bucket=name)

    def start(self) -> None:
        """Start serving and create the bucket (an existing one is reused)."""
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = _Server(_strip_conditions if self.ignore_conditions else None)
        self._server.start()
        self._port = self._server.get_host_and_port()[1]
        self._create_bucket()

    def _create_bucket(self, name: str | None = None) -> None:
        import boto3
        from botocore.exceptions import ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        try:
            client.create_bucket(Bucket=name or self.bucket)
        except ClientError as exc:  # moto state is per process: another server made it
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        finally:
            client.close()

    def stop(self) -> None:
        """Stop serving and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        if server._server is not None:
            server._server.server_close()

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._port is not None else "not started"
        return f"MotoServer({self.bucket!r}, {where}, ignore_conditions={self.ignore_conditions})"
