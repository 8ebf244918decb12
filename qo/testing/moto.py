"""A moto S3 server on a free loopback port, for tests and for trying qo without AWS.

``MotoServer(ignore_conditions=True)`` simulates an S3-compatible store that has no
conditional writes: ``If-Match`` / ``If-None-Match`` are stripped from every request
before moto sees them, so ``qo doctor`` can be tested against such a store.
``MotoServer(middleware=f)`` serves ``f(app)`` instead of moto's app: e.g.
``qo.testing.slowdown.SlowDown(rate=40)``, S3's ``503 SlowDown`` above a request rate
per prefix.

moto keeps its state per process: two servers in one process share buckets and objects.
"""

from __future__ import annotations

import logging
import threading
import uuid
from bisect import bisect_left, bisect_right
from typing import Any, Callable, Iterable
from urllib.parse import quote

from moto.s3.models import FakeBucket, FakeDeleteMarker, FakeTableStorageBucket, S3Backend
from moto.s3.utils import _VersionedKeyStore
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


def _one_at_a_time(app: _WSGIApp) -> _WSGIApp:
    """WSGI middleware that serves one request at a time, its body read inside the lock.

    moto checks If-Match / If-None-Match and then writes in two steps; under a threaded
    server two conditional writes can interleave between them and both succeed (seen
    as a lost update in the CAS race test). Real S3 is atomic here; so must be the
    server we prove qo against. Reads take the lock too: a GET streaming a key's value
    while a PUT replaced it read a closed buffer (a 500), and a LIST raced a delete.
    moto runs under the GIL either way, so little concurrency is lost.
    """
    lock = threading.Lock()

    def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        with lock:
            return list(app(environ, start_response))

    return wrapped


class _SortedKeyStore(_VersionedKeyStore):
    """moto's key store plus a sorted index of its names, so a LIST reads only its page.

    moto lists a bucket by copying and scanning every key in it and then sorting the
    matches: each LIST costs O(bucket), which makes long runs (the chaos run, a suite
    sharing a server) slow down as the bucket grows. Writes already run one at a time
    (:func:`_one_at_a_time`), so the index and the keys agree when a LIST reads them.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._names: list[str] = sorted(dict.keys(self))

    def _index(self, name: str) -> None:
        i = bisect_left(self._names, name)
        if i == len(self._names) or self._names[i] != name:
            self._names.insert(i, name)

    def _unindex(self, name: str) -> None:
        i = bisect_left(self._names, name)
        if i < len(self._names) and self._names[i] == name:
            del self._names[i]

    def __setitem__(self, key: str, value: Any) -> Any:
        super().__setitem__(key, value)
        self._index(key)

    def setlist(self, key: Any, list_: Any) -> Any:
        super().setlist(key, list_)
        self._index(key)

    def pop(self, key: str) -> None:  # type: ignore[override]
        super().pop(key)
        self._unindex(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._unindex(key)

    def scan(self, prefix: str, delimiter: str | None, after: str | None, limit: int) -> list[Any]:
        """Up to ``limit`` keys and common prefixes under ``prefix``, in name order, after ``after``."""
        names = self._names
        i = bisect_right(names, after) if after is not None and after >= prefix else bisect_left(names, prefix)
        out: list[Any] = []
        while i < len(names) and len(out) < limit:
            try:
                name = names[i]
            except IndexError:  # a delete shortened the index under us
                break
            if not name.startswith(prefix):
                break
            rest = name[len(prefix):]
            if delimiter and delimiter in rest:
                folder = prefix + rest.split(delimiter, 1)[0] + delimiter
                if after is None or folder > after:
                    out.append(folder)
                # every name under the folder sorts before the folder's successor
                i = bisect_left(names, folder[:-1] + chr(ord(folder[-1]) + 1))
                continue
            key = self.get(name)
            if key is not None and not isinstance(key, FakeDeleteMarker):
                out.append(key)
            i += 1
        return out


def _install_sorted_listing() -> None:
    """Give every bucket moto creates from now on a sorted index, and let LIST use it."""
    if getattr(FakeBucket, "_qo_sorted", False):
        return
    bucket_init = FakeBucket.__init__
    list_v2 = S3Backend.list_objects_v2

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        bucket_init(self, *args, **kwargs)
        self.keys = _SortedKeyStore(self.keys)

    def list_objects_v2(self: Any, bucket: Any, prefix: str | None, delimiter: str | None,
                        continuation_token: str | None, start_after: str | None, max_keys: int) -> Any:
        store = bucket.keys
        if not isinstance(store, _SortedKeyStore) or isinstance(bucket, FakeTableStorageBucket):
            return list_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        found = store.scan(prefix or "", delimiter, after, max_keys + 1)
        return self._truncate_result(found, max_keys)

    FakeBucket.__init__ = init  # type: ignore[method-assign]
    S3Backend.list_objects_v2 = list_objects_v2  # type: ignore[method-assign]
    FakeBucket._qo_sorted = True  # type: ignore[attr-defined]


class _Server(ThreadedMotoServer):
    """ThreadedMotoServer with an optional WSGI wrapper around moto's app."""

    def __init__(self, wrap: Callable[[_WSGIApp], _WSGIApp] | None, port: int = 0):
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self._wrap = wrap

    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )

        app = _one_at_a_time(_no_app_server_header(DomainDispatcherApplication(create_backend_app)))
        if self._wrap is not None:
            app = self._wrap(app)
        self._server = make_server(
            self._ip_address, self._port, app, threaded=True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class MotoServer:
    """A moto S3 server on ``127.0.0.1`` (a free port, or ``port``: e.g. one a client
    already tries, to start the store after it) with one bucket created at start."""

    def __init__(self, bucket: str = "qo-test", ignore_conditions: bool = False,
                 middleware: Callable[[_WSGIApp], _WSGIApp] | None = None, port: int = 0):
        self.bucket = bucket
        self.port = port
        self.ignore_conditions = ignore_conditions
        #: WSGI middleware around moto's app (outermost: it sees every request first)
        self.middleware = middleware
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

        A bucket per test keeps tests apart (and moto's own state small).
        """
        name = f"qo-{uuid.uuid4().hex[:20]}"
        self._create_bucket(name)
        return self.url(prefix, bucket=name)

    def start(self) -> None:
        """Start serving and create the bucket (an existing one is reused)."""
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        _install_sorted_listing()
        wraps = [w for w in (_strip_conditions if self.ignore_conditions else None, self.middleware) if w]

        def wrap(app: _WSGIApp) -> _WSGIApp:
            for w in wraps:
                app = w(app)
            return app

        self._server = _Server(wrap if wraps else None, self.port)
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
