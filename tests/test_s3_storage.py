"""S3-specific behaviour of qo_s3.S3Storage (the general contract is in the conformance suite)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

import qo
from qo.storage import NotFound, PreconditionFailed, StorageError, StorageUnavailable, Throttled
from qo_s3 import plugin
from qo_s3.storage import S3Storage, map_error, parse_url

SECRET = "SeCrEt-" + uuid.uuid4().hex
KEY_ID = "AKIA" + uuid.uuid4().hex[:16].upper()
TOKEN = "ToKeN-" + uuid.uuid4().hex


def client_error(code: str, status: int, message: str = "msg", op: str = "PutObject") -> ClientError:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, op)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def storage(moto_server):
    st = S3Storage(moto_server.url(prefix=f"s3t-{uuid.uuid4().hex[:12]}"))
    yield st
    await st.close()


@pytest.fixture(scope="module")
def lax_server():
    """A moto server that ignores If-Match / If-None-Match, like a store without CAS."""
    from qo.testing.moto import MotoServer

    server = MotoServer(bucket="qo-lax", ignore_conditions=True)
    server.start()
    yield server
    server.stop()


# -- URL and configuration --------------------------------------------------------------


def test_parse_url_bucket_prefix_and_query():
    bucket, prefix, settings = parse_url(
        "s3://my-bucket/a/b/?endpoint_url=http%3A%2F%2F127.0.0.1%3A9000&region=eu-west-1&profile=dev"
    )
    assert (bucket, prefix) == ("my-bucket", "a/b")
    assert settings == {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "profile": "dev"}
    assert parse_url("s3://my-bucket") == ("my-bucket", "", {})
    assert parse_url("s3://my-bucket/?endpoint=http://h:1&region_name=r")[2] == {
        "endpoint_url": "http://h:1",
        "region": "r",
    }


@pytest.mark.parametrize(
    "url",
    [
        "s3://Bad_Bucket!/x",
        "s3://ab/x",
        "s3:///prefix",
        "s3://bucket/a/../b",
        "s3://bucket/x?unknown=1",
        "s3://bucket/x?secret=hunter2",
        "s3://bucket/x#frag",
        "s3://bucket/x?endpoint_url=ftp://host",
    ],
)
def test_bad_urls_are_invalid_input_before_any_request(url):
    with pytest.raises(qo.InvalidInput) as info:
        S3Storage(url)
    assert info.value.field == "url"


def test_credentials_in_url_are_refused_without_echoing_them():
    with pytest.raises(qo.InvalidInput) as info:
        S3Storage(f"s3://{KEY_ID}:{SECRET}@bucket/x")
    assert SECRET not in str(info.value) and KEY_ID not in str(info.value)


def test_settings_precedence_options_then_url_then_env(monkeypatch):
    monkeypatch.setenv("QO_S3_REGION", "env-region")
    monkeypatch.setenv("QO_S3_ENDPOINT_URL", "http://env-host:1")
    st = S3Storage("s3://bucket/p")
    assert (st.region, st.endpoint_url) == ("env-region", "http://env-host:1")
    st = S3Storage("s3://bucket/p?region=url-region")
    assert (st.region, st.endpoint_url) == ("url-region", "http://env-host:1")
    st = S3Storage("s3://bucket/p?region=url-region", region="opt-region", endpoint_url="https://opt:2")
    assert (st.region, st.endpoint_url) == ("opt-region", "https://opt:2")


def test_bad_options_are_refused():
    with pytest.raises(qo.InvalidInput):
        S3Storage("s3://bucket", colour="blue")
    with pytest.raises(qo.InvalidInput):
        S3Storage("s3://bucket", read_timeout="soon")
    with pytest.raises(qo.ConfigurationError):
        S3Storage("s3://bucket", key="only-a-key-id")


def test_plugin_claims_only_s3_urls(monkeypatch):
    assert isinstance(plugin.qo_storage(url="s3://bucket/p", options={}), S3Storage)
    assert plugin.qo_storage(url="file:///tmp/x", options={}) is None
    assert plugin.qo_storage(url="/tmp/x", options={}) is None
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the extra were not installed
    with pytest.raises(qo.ConfigurationError, match=r"pip install 'qo-queue\[s3\]' \(from a checkout: pip install '\.\[s3\]'\)"):
        plugin.qo_storage(url="s3://bucket/p", options={})


# -- keys and requests ------------------------------------------------------------------


async def test_keys_are_relative_to_the_prefix(moto_server):
    base = f"rel-{uuid.uuid4().hex[:8]}"
    inner = S3Storage(moto_server.url(prefix=f"{base}/p"))
    sibling = S3Storage(moto_server.url(prefix=f"{base}/px"))
    whole = S3Storage(moto_server.url())
    try:
        await inner.put("a/b", b"1")
        await sibling.put("a/b", b"2")
        assert [e.key for e in await inner.list("")] == ["a/b"]
        assert [e.key for e in await inner.list("a/")] == ["a/b"]
        assert (await whole.get(f"{base}/p/a/b")).data == b"1"
        assert [e.key for e in await whole.list(f"{base}/")] == [f"{base}/p/a/b", f"{base}/px/a/b"]
    finally:
        for st in (inner, sibling, whole):
            await st.close()


async def test_get_put_list_shapes(storage):
    etag = await storage.put("k", b"hello", if_none_match=True)
    assert etag.startswith('"') and etag.endswith('"')
    assert await storage.get("k") == qo.Blob(b"hello", etag)
    (entry,) = await storage.list("")
    assert (entry.key, entry.etag, entry.size) == ("k", etag, 5)
    assert isinstance(entry.modified, float) and abs(entry.modified - time.time()) < 60
    with pytest.raises(NotFound) as info:
        await storage.get("missing")
    assert "s3" in str(info.value) and "missing" in str(info.value)


async def test_cas_on_missing_key_is_precondition_failed(storage):
    with pytest.raises(PreconditionFailed):
        await storage.put("absent", b"x", if_match='"0123"')
    await storage.delete("absent", if_match='"0123"')  # missing: not an error


async def test_list_follows_continuation_past_one_page(storage):
    storage.page_size = 2
    keys = [f"many/{i}" for i in range(7)]
    await asyncio.gather(*(storage.put(k, b"") for k in keys))
    assert [e.key for e in await storage.list("many/")] == keys
    assert [e.key for e in await storage.list("many/", limit=5)] == keys[:5]
    assert [e.key for e in await storage.list("many/", start_after="many/2", limit=3)] == keys[3:6]


async def test_delete_many_is_one_request(storage):
    keys = [f"d/{i:03d}" for i in range(120)]
    await asyncio.gather(*(storage.put(k, b"x") for k in keys))
    sent: list[str] = []
    client = await storage._s3(None)
    client.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.method))
    await storage.delete_many(keys + ["d/never-existed"])
    assert sent == ["POST"]
    assert await storage.list("d/") == []
    with pytest.raises(qo.InvalidInput):
        await storage.delete_many([f"x/{i}" for i in range(1001)])


async def test_close_then_reuse_reconnects(storage):
    await storage.put("k", b"1")
    await storage.close()
    assert storage._client is None
    assert (await storage.get("k")).data == b"1"


# -- the conditional-write simulation --------------------------------------------------


async def test_ignore_conditions_server_accepts_a_second_create_only_put(lax_server, moto_server):
    prefix = f"lax-{uuid.uuid4().hex[:8]}"
    lax = S3Storage(lax_server.url(prefix=prefix) + "&unsafe=1")  # forced: else refused (test_real_s3.py)
    strict = S3Storage(moto_server.url(prefix=prefix))
    try:
        await lax.put("k", b"first", if_none_match=True)
        await lax.put("k", b"second", if_none_match=True)  # a real S3 would refuse this
        assert (await lax.get("k")).data == b"second"
        await strict.put("k2", b"x", if_none_match=True)
        with pytest.raises(PreconditionFailed):  # the same request on a normal server
            await strict.put("k2", b"y", if_none_match=True)
    finally:
        await lax.close()
        await strict.close()


# -- error mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, expected",
    [
        (client_error("ConditionalRequestConflict", 409), StorageUnavailable),  # unknown outcome: re-read
        (client_error("PreconditionFailed", 412), PreconditionFailed),
        (client_error("SlowDown", 503), Throttled),
        (client_error("ServiceUnavailable", 503), Throttled),
        (client_error("", 503), Throttled),
        (client_error("TooManyRequests", 429), Throttled),
        (client_error("Throttling", 400), Throttled),
        (client_error("RequestLimitExceeded", 400), Throttled),
        (client_error("InternalError", 500), StorageUnavailable),
        (client_error("RequestTimeout", 400), StorageUnavailable),
        (client_error("BadGateway", 502), StorageUnavailable),
        (client_error("NoSuchKey", 404, op="GetObject"), NotFound),
        (EndpointConnectionError(endpoint_url="http://h"), StorageUnavailable),
        (ReadTimeoutError(endpoint_url="http://h"), StorageUnavailable),
        (aiohttp.ServerDisconnectedError(), StorageUnavailable),
        (asyncio.TimeoutError(), StorageUnavailable),
        (ConnectionResetError(), StorageUnavailable),
    ],
)
def test_error_mapping(exc, expected):
    err = map_error(exc, key="q/k", op="put_object")
    assert type(err) is expected
    assert "s3" in str(err) and "q/k" in str(err)


@pytest.mark.parametrize(
    "code, status",
    [("NoSuchBucket", 404), ("AccessDenied", 403), ("InvalidAccessKeyId", 403), ("SignatureDoesNotMatch", 403)],
)
def test_configuration_errors_are_plain_storage_errors(code, status):
    err = map_error(client_error(code, status), key="k", bucket="bkt")
    assert type(err) is StorageError
    assert code in str(err)


def test_no_credentials_says_how_to_fix():
    err = map_error(NoCredentialsError(), key="k")
    assert type(err) is StorageError and "QO_S3_ACCESS_KEY_ID" in str(err)


class _SlowDown(BaseHTTPRequestHandler):
    """Answers every request with S3's 503 SlowDown, counting requests."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET

    def log_message(self, *args: object) -> None:
        pass


async def test_503_slowdown_is_throttled_and_not_retried_by_botocore(monkeypatch):
    # botocore's own retry settings from the environment must not add attempts
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    _SlowDown.hits = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # dialect declared: nothing to learn first, the one request is the put's
    st = S3Storage(f"s3://bucket/p?endpoint_url=http://127.0.0.1:{server.server_port}&dialect=aws")
    try:
        with pytest.raises(Throttled, match="SlowDown"):
            await st.put("q/tasks/k", b"x", if_none_match=True)
        assert _SlowDown.hits == 1  # the engine retries, not botocore
        assert st.pacer.throttles == 1 and st.pacer.rate("q/tasks/") == st.pacer.floor  # paced from now on
    finally:
        await st.close()
        server.shutdown()
        server.server_close()


async def test_connection_refused_is_unavailable():
    port = closed_port()
    st = S3Storage(f"s3://bucket/p?endpoint_url=http://127.0.0.1:{port}")
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            await st.get("some/key")
        assert time.monotonic() - t0 < 10  # no botocore retries
        assert "some/key" in str(info.value)
        assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in str(info.value)  # where it looked
    finally:
        await st.close()


def test_cli_on_an_unreachable_endpoint_names_it_and_gives_up_after_a_few_tries(monkeypatch):
    from click.testing import CliRunner

    from qo.cli import build_cli
    from qo.cli import common

    calls = []

    def counting(real):
        async def counted(self, *args, **kwargs):
            calls.append(1)
            return await real(self, *args, **kwargs)
        return counted

    # the first request of a fresh process reads the queue's settings (its key layout)
    monkeypatch.setattr(S3Storage, "list", counting(S3Storage.list))
    monkeypatch.setattr(S3Storage, "get", counting(S3Storage.get))
    port = closed_port()
    url = f"s3://bucket/p?endpoint_url=http%3A%2F%2F127.0.0.1%3A{port}"
    r = CliRunner().invoke(build_cli(), ["list", "--url", url])
    assert r.exit_code == 1 and f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in r.stderr
    assert len(calls) == common.INTERACTIVE_ATTEMPTS  # a person waits about a second, not 9


async def test_credentials_never_appear_in_errors_or_repr(moto_server):
    creds = {"key": KEY_ID, "secret": SECRET, "token": TOKEN}
    no_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/p?endpoint_url={moto_server.endpoint_url}"
    refused = f"s3://bucket/p?endpoint_url=http://127.0.0.1:{closed_port()}"
    texts: list[str] = []
    for url in (no_bucket, refused):
        st = S3Storage(url, **creds)
        texts.append(repr(st))
        try:
            calls = (lambda: st.get("k"), lambda: st.put("k", b"x", if_none_match=True), lambda: st.list(""))
            for call in calls:
                with pytest.raises(StorageError) as info:
                    await call()
                texts += [str(info.value), repr(info.value)]
        finally:
            await st.close()
    assert "does not exist" in texts[1]
    echo = client_error("AccessDenied", 403, f"bad key {KEY_ID} / {SECRET}")  # a server echoing them
    texts.append(str(map_error(echo, key="k", secrets=(KEY_ID, SECRET))))
    for text in texts:
        assert SECRET not in text and KEY_ID not in text and TOKEN not in text


# -- server clock -----------------------------------------------------------------------


async def test_clock_offset_is_near_zero_against_moto(storage):
    assert storage.clock_offset == 0.0
    for i in range(3):
        await storage.put(f"c{i}", b"")
    assert abs(storage.clock_offset) < 1.0
    assert storage._server_clock.bounds is not None


def test_clock_offset_follows_a_skewed_server_and_a_jump():
    st = S3Storage("s3://bucket/p")

    def observe(server: float, t0: float, t1: float) -> None:
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(server))
        st._observe({"ResponseMetadata": {"HTTPHeaders": {"date": date}}}, t0, t1)

    now = 1_800_000_000.0
    # the server is 100.3 s ahead and its Date header truncates; samples either side of
    # the second boundary (local fraction 0.7) pin the offset down
    for i, frac in enumerate((0.1, 0.4, 0.68, 0.72, 0.95)):
        local = now + 10 * i + frac
        observe(int(local + 100.3), local - 0.01, local + 0.01)
    assert abs(st.clock_offset - 100.3) < 0.1
    observe(now + 50 - 5, now + 50, now + 50.02)  # the server clock stepped back 105 s
    assert abs(st.clock_offset - (-4.5)) < 0.6
    st._observe({"ResponseMetadata": {"HTTPHeaders": {}}}, now, now)  # no Date: ignored
    assert abs(st.clock_offset - (-4.5)) < 0.6


def test_moto_sorted_listing_answers_as_moto_does(moto_server):
    """qo.testing.moto's indexed LIST gives moto's own answers: prefixes, delimiters,
    start-after, pages; after deletes too (the index must follow them)."""
    import random

    import boto3

    from qo.testing import moto as qo_moto

    client = boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    url = moto_server.new_bucket()
    bucket = url.split("/")[2]
    rng = random.Random(7)
    names = sorted({"/".join(rng.choice("ab/c") for _ in range(rng.randint(1, 7))).replace("//", "/x/")
                    + rng.choice(["", ".json", "/z"]) for _ in range(300)})
    for name in names:
        client.put_object(Bucket=bucket, Key=name, Body=b"x")
    for name in names[::5]:
        client.delete_object(Bucket=bucket, Key=name)
    from moto.backends import get_backend

    backend = get_backend("s3")["123456789012"]["global"]
    fake = backend.buckets[bucket]
    assert isinstance(fake.keys, qo_moto._SortedKeyStore)
    assert fake.keys._names == sorted(dict.keys(fake.keys))

    def listing(**kw):
        pages, out = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, **kw), []
        for page in pages:
            out += [c["Key"] for c in page.get("Contents", [])]
            out += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        return sorted(out)

    alive = [n for n in names if n not in names[::5]]
    for prefix in ["", "a", "a/", "b/c", "zz"]:
        for delimiter in [None, "/"]:
            for page_size in [1, 7, 1000]:
                kw = {"Prefix": prefix, "PaginationConfig": {"PageSize": page_size}}
                if delimiter:
                    kw["Delimiter"] = delimiter
                under = [n for n in alive if n.startswith(prefix)]
                if delimiter:
                    expected = sorted({prefix + n[len(prefix):].split("/", 1)[0] + "/"
                                       if "/" in n[len(prefix):] else n for n in under})
                else:
                    expected = under
                assert listing(**kw) == expected, (prefix, delimiter, page_size)
        after = alive[len(alive) // 2]
        got = client.list_objects_v2(Bucket=bucket, Prefix=prefix, StartAfter=after).get("Contents", [])
        assert [c["Key"] for c in got] == [n for n in alive if n.startswith(prefix) and n > after][:1000]
