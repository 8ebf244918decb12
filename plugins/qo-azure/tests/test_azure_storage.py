"""Azure-specific behaviour of qo_azure.AzureStorage (the contract itself: the conformance kit).

URL parsing and credentials, error mapping, secrets kept out of text, the UTF-8 listing
order on a UTF-16-ordered server, batch deletes, the server clock, and the plugin seen
from outside (entry point, ``qo doctor``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from click.testing import CliRunner

import qo
from qo.storage import NotFound, PreconditionFailed, StorageError, StorageUnavailable, Throttled
from qo_azure import AzureStorage, plugin
from qo_azure import listing
from qo_azure.errors import map_error
from qo.backend_kit import ServerClock
from qo_azure.settings import DEVSTORE_KEY, parse_url, resolve

SECRET_KEY = "c2VjcmV0LWtleS0" + uuid.uuid4().hex + "=="
SAS_SIG = "SiG" + uuid.uuid4().hex
SAS = f"sv=2024-11-04&ss=b&srt=co&sp=rwdlac&se=2030-01-01T00:00:00Z&sig={SAS_SIG}"
ACCOUNT = "qoaccount"


@pytest.fixture
def no_azure_env(monkeypatch):
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT",
                 "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def http_error(cls: type, status: int, code: str, reason: str = "reason") -> HttpResponseError:
    error = cls(message=f"{reason}\nRequestId:x\nErrorCode:{code}")
    error.status_code, error.error_code, error.reason = status, code, reason
    return error


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def storage(azure_url):
    st = AzureStorage(azure_url)
    yield st
    await st.close()


# -- URL and credentials ----------------------------------------------------------------


def test_parse_url_container_prefix_and_query():
    container, prefix, settings = parse_url("az://my-container/a/b/?account=acct&endpoint_url=http%3A%2F%2Fh%3A1")
    assert (container, prefix) == ("my-container", "a/b")
    assert settings == {"account_name": "acct", "endpoint_url": "http://h:1"}
    assert parse_url("az://abc") == ("abc", "", {})


@pytest.mark.parametrize("url", [
    "az://Bad_Container/x", "az://ab/x", "az://a--b/x", "az:///prefix", "az://cont/a/../b",
    "az://cont/x?unknown=1", "az://cont/x?account_key=hunter2", "az://cont/x?sas=abc", "az://cont/x#frag",
    "az://cont/x?endpoint_url=ftp://host", "az://cont/x?endpoint_url=http://h:1/?sig=secret",
    "az://cont/x.?account=acct", "az://cont/ends-with-dot./x",
])
def test_bad_urls_are_invalid_input_before_any_request(url, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", f"AccountName={ACCOUNT};AccountKey={SECRET_KEY}")
    with pytest.raises(qo.InvalidInput) as info:
        AzureStorage(url)
    assert info.value.field == "url"
    assert "hunter2" not in str(info.value) and "secret" not in str(info.value)


def test_credentials_in_the_url_are_refused_without_echoing_them():
    with pytest.raises(qo.InvalidInput) as info:
        AzureStorage(f"az://{ACCOUNT}:{SECRET_KEY}@container/x")
    assert SECRET_KEY not in str(info.value)


def test_connection_string_gives_account_key_and_endpoint(no_azure_env, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={SECRET_KEY};"
                       "EndpointSuffix=core.windows.net")
    s = resolve("az://cont/p", {})
    assert (s.account_name, s.endpoint, s.auth) == (ACCOUNT, f"https://{ACCOUNT}.blob.core.windows.net", "account key")
    assert s.account_key == SECRET_KEY and SECRET_KEY in s.secrets
    s = resolve("az://cont/p?endpoint_url=http://127.0.0.1:1/acct", {})  # the URL's endpoint wins
    assert s.endpoint == "http://127.0.0.1:1/acct"
    with pytest.raises(qo.ConfigurationError, match="connection string is for"):
        resolve("az://cont/p?account=otheraccount", {})


def test_development_storage_connection_string(no_azure_env):
    s = resolve("az://cont", {"connection_string": "UseDevelopmentStorage=true"})
    assert (s.account_name, s.endpoint, s.account_key) == (
        "devstoreaccount1", "http://127.0.0.1:10000/devstoreaccount1", DEVSTORE_KEY)


def test_account_with_key_or_sas_from_the_environment(no_azure_env, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + SAS)
    s = resolve("az://cont", {})
    assert (s.auth, s.sas_token) == ("sas token", SAS)
    assert SAS in s.secrets and SAS_SIG in s.secrets
    monkeypatch.setenv("AZURE_STORAGE_KEY", SECRET_KEY)  # the Azure CLI's spelling
    assert resolve("az://cont", {}).auth == "account key"
    # an explicit option wins over the environment, and nothing of the environment mixes in
    s = resolve("az://cont", {"sas_token": "sv=1&sig=OptionSig"})
    assert (s.auth, s.sas_token) == ("sas token", "sv=1&sig=OptionSig")


def test_no_credentials_names_the_variables(no_azure_env, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "azure.identity.aio", None)  # as if not installed
    with pytest.raises(qo.ConfigurationError, match="AZURE_STORAGE_CONNECTION_STRING"):
        AzureStorage("az://cont/p")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    with pytest.raises(qo.ConfigurationError, match="azure-identity"):
        AzureStorage("az://cont/p")


def test_bad_options_are_refused(no_azure_env):
    with pytest.raises(qo.InvalidInput):
        AzureStorage("az://cont", colour="blue", account_name=ACCOUNT, account_key=SECRET_KEY)
    with pytest.raises(qo.InvalidInput):
        AzureStorage("az://cont", read_timeout="soon", account_name=ACCOUNT, account_key=SECRET_KEY)
    with pytest.raises(qo.ConfigurationError):
        AzureStorage("az://cont", connection_string="no equals sign")


def test_plugin_claims_only_az_urls(no_azure_env, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true")
    assert isinstance(plugin.qo_storage(url="az://cont/p", options={}), AzureStorage)
    assert plugin.qo_storage(url="s3://bucket/p", options={}) is None
    assert plugin.qo_storage(url="/tmp/x", options={}) is None
    monkeypatch.setitem(__import__("sys").modules, "azure.storage.blob.aio", None)
    with pytest.raises(qo.ConfigurationError, match="pip install qo-azure"):
        plugin.qo_storage(url="az://cont/p", options={})


def test_the_plugin_is_loaded_from_its_entry_point():
    from qo.plugins import Plugins

    plugins = Plugins()
    plugins.load_entry_points()
    info = plugins.info["azure"]
    assert (info.status, info.distribution) == ("loaded", "qo-azure")
    assert "az" in plugins.schemes()


# -- secrets never printed --------------------------------------------------------------


async def test_credentials_never_appear_in_errors_reprs_or_logs(no_azure_env, caplog):
    caplog.set_level(logging.DEBUG)
    endpoint = f"http://127.0.0.1:{closed_port()}/{ACCOUNT}"
    texts: list[str] = []
    for opts in ({"account_key": SECRET_KEY}, {"sas_token": SAS},
                 {"connection_string": f"AccountName={ACCOUNT};AccountKey={SECRET_KEY};BlobEndpoint={endpoint}"}):
        st = AzureStorage(f"az://cont/p?endpoint_url={endpoint}", account_name=ACCOUNT, **opts)
        texts += [repr(st), repr(st.settings)]
        try:
            for call in (lambda: st.get("k"), lambda: st.put("k", b"x", if_none_match=True), lambda: st.list("")):
                with pytest.raises(StorageUnavailable) as info:
                    await call()
                texts += [str(info.value), repr(info.value)]
        finally:
            await st.close()
    echo = http_error(ClientAuthenticationError, 403, "AuthenticationFailed", f"bad {SECRET_KEY} {SAS_SIG}")
    texts.append(str(map_error(echo, key="k", secrets=(SECRET_KEY, SAS_SIG))))
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").warning("url ?%s key %s", SAS, SECRET_KEY)
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert SECRET_KEY not in text and SAS_SIG not in text, text


async def test_a_wrong_account_key_is_a_plain_storage_error_without_the_key(azurite, no_azure_env):
    wrong = "d3Jvbmcta2V5LQ" + uuid.uuid4().hex + "=="
    container = azurite.new_container().removeprefix("az://")
    st = AzureStorage(f"az://{container}/p?endpoint_url={azurite.endpoint_url}",
                      account_name="devstoreaccount1", account_key=wrong)
    try:
        with pytest.raises(StorageError) as info:
            await st.put("k", b"x")
    finally:
        await st.close()
    assert type(info.value) is StorageError and "HTTP 403" in str(info.value)  # Azurite: AuthorizationFailure
    assert wrong not in str(info.value)


# -- error mapping ------------------------------------------------------------------------


@pytest.mark.parametrize("exc, expected", [
    (http_error(ResourceExistsError, 409, "BlobAlreadyExists"), PreconditionFailed),
    (http_error(ResourceModifiedError, 412, "ConditionNotMet"), PreconditionFailed),
    (http_error(ResourceNotFoundError, 404, "BlobNotFound"), NotFound),
    (http_error(HttpResponseError, 503, "ServerBusy"), Throttled),
    (http_error(HttpResponseError, 429, "TooManyRequests"), Throttled),
    (http_error(HttpResponseError, 503, "AccountRequestRateIsTooHigh"), Throttled),
    (http_error(HttpResponseError, 503, ""), Throttled),
    (http_error(HttpResponseError, 500, "InternalError"), StorageUnavailable),
    (http_error(HttpResponseError, 500, "OperationTimedOut"), StorageUnavailable),
    (http_error(HttpResponseError, 502, ""), StorageUnavailable),
    (ServiceRequestError("cannot connect"), StorageUnavailable),
    (ServiceResponseError("connection reset"), StorageUnavailable),
    (aiohttp.ServerDisconnectedError(), StorageUnavailable),
    (asyncio.TimeoutError(), StorageUnavailable),
    (ConnectionResetError(), StorageUnavailable),
])
def test_error_mapping(exc, expected):
    err = map_error(exc, key="q/k", op="put_blob")
    assert type(err) is expected
    assert "azure" in str(err) and "q/k" in str(err)


@pytest.mark.parametrize("status, code", [
    (404, "ContainerNotFound"), (403, "AuthenticationFailed"), (403, "AuthorizationPermissionMismatch"),
    (409, "LeaseIdMissing"), (400, "InvalidHeaderValue"),
])
def test_configuration_errors_are_plain_storage_errors(status, code):
    err = map_error(http_error(HttpResponseError, status, code), key="k", container="cont")
    assert type(err) is StorageError and code in str(err)


async def test_a_missing_container_says_so(azurite, no_azure_env, monkeypatch):
    azurite.export_env()
    st = AzureStorage(f"az://qo-missing-{uuid.uuid4().hex[:12]}/p")
    try:
        with pytest.raises(StorageError, match="does not exist") as info:
            await st.put("k", b"x", if_none_match=True)
        assert type(info.value) is StorageError
    finally:
        await st.close()


class _ServerBusy(BaseHTTPRequestHandler):
    """Answers every request with Azure's 503 ServerBusy, counting requests."""

    hits = 0

    def _busy(self) -> None:
        type(self).hits += 1
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"<?xml version='1.0'?><Error><Code>ServerBusy</Code><Message>busy</Message></Error>"
        self.send_response(503, "The server is busy.")
        self.send_header("x-ms-error-code", "ServerBusy")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_DELETE = do_HEAD = _busy

    def log_message(self, *args: object) -> None:
        pass


async def test_503_server_busy_is_unavailable_and_not_retried_by_the_sdk(no_azure_env):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ServerBusy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}/{ACCOUNT}"
    st = AzureStorage(f"az://cont/p?endpoint_url={endpoint}", account_name=ACCOUNT, account_key=SECRET_KEY)
    try:
        with pytest.raises(Throttled, match="ServerBusy"):
            await st.put("k", b"x", if_none_match=True)
        assert _ServerBusy.hits == 1  # the engine retries, not the SDK
    finally:
        await st.close()
        server.shutdown()
        server.server_close()


async def test_connection_refused_is_unavailable_at_once(no_azure_env):
    endpoint = f"http://127.0.0.1:{closed_port()}/{ACCOUNT}"
    st = AzureStorage(f"az://cont/p?endpoint_url={endpoint}", account_name=ACCOUNT, account_key=SECRET_KEY)
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            await st.get("some/key")
        assert time.monotonic() - t0 < 5  # no SDK retries
        assert "some/key" in str(info.value)
    finally:
        await st.close()


# -- keys, requests, listing -----------------------------------------------------------------


async def test_keys_azure_cannot_store_are_refused_up_front(storage):
    for key in ("a.", "x./y", "tab\there", "bell\x07"):
        with pytest.raises(qo.InvalidInput):
            await storage.put(key, b"x")
        with pytest.raises(qo.InvalidInput):
            await storage.get(key)
    assert await storage.list("") == []


async def test_an_old_test_server_restarts_between_tests_with_a_fresh_connection_string(azurite):
    """Azurite's first garbage collection (10 minutes after start) stalls it for over a
    minute after a suite's worth of writes: the fixtures restart it before then."""
    before = azurite.connection_string
    azurite.restart_if_older(3600)
    assert azurite.connection_string == before  # young: left alone
    url = azurite.new_container()
    azurite.restart_if_older(0)
    assert azurite.connection_string != before
    assert os.environ["AZURE_STORAGE_CONNECTION_STRING"] == azurite.connection_string
    st = AzureStorage(azurite.new_container())
    try:
        await st.put("k", b"v", if_none_match=True)
        assert (await st.get("k")).data == b"v"
    finally:
        await st.close()
    gone = AzureStorage(url)  # the restarted server keeps nothing
    try:
        with pytest.raises(StorageError):
            await gone.list("")
    finally:
        await gone.close()


async def test_keys_are_relative_to_the_prefix(azurite):
    url = azurite.new_container()
    inner, sibling, whole = AzureStorage(f"{url}/base/p"), AzureStorage(f"{url}/base/px"), AzureStorage(url)
    try:
        await inner.put("a/b", b"1")
        await sibling.put("a/b", b"2")
        assert [e.key for e in await inner.list("")] == ["a/b"]
        assert (await whole.get("base/p/a/b")).data == b"1"
        assert [e.key for e in await whole.list("base/")] == ["base/p/a/b", "base/px/a/b"]
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
    assert "azure" in str(info.value) and "missing" in str(info.value)


async def test_conditional_delete_of_a_missing_key_is_not_an_error(storage):
    await storage.delete("absent", if_match='"0x8D0000000000000"')  # Azure answers 412 here
    etag = await storage.put("present", b"x")
    await storage.put("present", b"y")
    with pytest.raises(PreconditionFailed):
        await storage.delete("present", if_match=etag)


async def test_list_follows_continuation_past_one_page(storage):
    storage.page_size = 2
    keys = [f"many/{i}" for i in range(7)]
    await asyncio.gather(*(storage.put(k, b"") for k in keys))
    requests = storage.http_requests
    assert [e.key for e in await storage.list("many/")] == keys
    assert storage.http_requests - requests == 4  # pages of 2
    assert [e.key for e in await storage.list("many/", limit=5)] == keys[:5]
    assert [e.key for e in await storage.list("many/", start_after="many/2", limit=3)] == keys[3:6]


async def test_utf8_order_although_azurite_lists_in_utf16_order(storage):
    """U+FB01 sorts before U+1F642 in UTF-8 and after it in UTF-16 (Azurite's order)."""
    lig, emoji = "\ufb01", "\U0001f642"
    keys = [f"u/{lig}", f"u/{lig}/x", f"u/{emoji}", f"u/{emoji}{lig}", "u/z"]
    await asyncio.gather(*(storage.put(k, b"") for k in keys))
    expected = sorted(keys, key=lambda k: k.encode())
    assert [e.key for e in await storage.list("u/")] == expected
    storage.page_size = 1  # one name per request: the stop rule, not one big page, must get it right
    for limit in range(1, len(keys) + 1):
        assert [e.key for e in await storage.list("u/", limit=limit)] == expected[:limit], limit
    for i, after in enumerate(expected):
        assert [e.key for e in await storage.list("u/", start_after=after)] == expected[i + 1:], after


def test_listing_rules():
    assert listing.start_from("ready/001/x") == "ready/001/x"
    assert listing.start_from("u/a\ufb01b") == "u/a"  # may be preceded by a key with an emoji there
    assert listing.complete(["a", "b"], 2, "b", exhausted=False)
    assert listing.complete(["a"], 2, "a", exhausted=True)
    assert not listing.complete(["a"], 2, "a", exhausted=False)
    emoji = "u/\U0001f642"
    assert not listing.complete([emoji], 1, emoji, exhausted=False)  # "u/\ufb01" may still come
    assert listing.complete([emoji], 1, "v", exhausted=False)


async def test_delete_many_is_one_batch_request_per_256_keys(storage):
    keys = [f"d/{i:03d}" for i in range(260)]
    await asyncio.gather(*(storage.put(k, b"x") for k in keys[:50]))
    before = storage.http_requests
    await storage.delete_many(keys[:50] + ["d/never-existed"])
    assert storage.http_requests - before == 1
    assert await storage.list("d/") == []
    await asyncio.gather(*(storage.put(k, b"x") for k in keys))
    before = storage.http_requests
    await storage.delete_many(keys)
    assert storage.http_requests - before == 2
    assert await storage.list("d/") == []
    with pytest.raises(qo.InvalidInput):
        await storage.delete_many([f"x/{i}" for i in range(1001)])


class _SubResponse:
    """One delete's answer inside a blob batch, as the SDK hands it back."""

    def __init__(self, status: int, code: str = ""):
        self.status_code = status
        self.reason = "The value for one of the inputs is not valid." if status == 400 else "Accepted"
        self.headers = {"x-ms-error-code": code} if code else {}


def fake_batch(monkeypatch, answer):
    """Replace the SDK's ``delete_blobs`` by one that deletes nothing and answers each
    blob with ``answer(name)``'s status and code; returns the list of calls made."""
    from azure.storage.blob.aio import ContainerClient

    calls: list[tuple[str, ...]] = []

    async def delete_blobs(self, *names, **kwargs):
        calls.append(names)

        async def responses():
            for name in names:
                yield _SubResponse(*answer(name))

        return responses()

    monkeypatch.setattr(ContainerClient, "delete_blobs", delete_blobs)
    return calls


async def test_sub_requests_refused_fall_back_to_single_deletes_and_are_remembered(storage, monkeypatch):
    # Azurite 3.35.0: the batch request succeeds, every delete inside it is 400 InvalidInput
    keys = [f"d/{i}" for i in range(5)]
    await asyncio.gather(*(storage.put(k, b"x") for k in keys))
    calls = fake_batch(monkeypatch, lambda name: (400, "InvalidInput"))
    await storage.delete_many(keys + ["d/never-existed"])
    assert len(calls) == 1 and len(calls[0]) == 6
    assert await storage.list("d/") == []  # every key deleted by a single Delete Blob
    assert storage._batch_ok is False
    await asyncio.gather(*(storage.put(k, b"x") for k in keys))
    before = storage.http_requests
    await storage.delete_many(keys)
    assert len(calls) == 1  # no second batch: straight to single deletes
    assert storage.http_requests - before == len(keys)
    assert await storage.list("d/") == []


async def test_a_refused_sub_request_among_accepted_ones_is_deleted_alone(storage, monkeypatch):
    keys = ["p/a", "p/b", "p/c"]
    await asyncio.gather(*(storage.put(k, b"x") for k in keys))
    # the fake deletes nothing: "accepted" keys stay, so what is gone was deleted singly
    calls = fake_batch(monkeypatch, lambda name: (400, "InvalidInput") if name.endswith("/b") else (202, ""))
    await storage.delete_many(keys)
    assert len(calls) == 1
    assert [e.key for e in await storage.list("p/")] == ["p/a", "p/c"]
    assert storage._batch_ok is True  # batches work here: only that one delete was refused


async def test_sub_response_404_is_a_missing_key_not_an_error(storage, monkeypatch):
    calls = fake_batch(monkeypatch, lambda name: (404, "BlobNotFound"))
    await storage.delete_many(["m/a", "m/b"])
    assert len(calls) == 1 and storage._batch_ok is True
    before = storage.http_requests
    await storage.delete_many(["m/c"])
    assert len(calls) == 2 and storage.http_requests == before  # still batched (the fake sends nothing)


async def test_a_failed_sub_request_that_is_not_a_refusal_raises(storage, monkeypatch):
    fake_batch(monkeypatch, lambda name: (503, "ServerBusy"))
    with pytest.raises(StorageUnavailable):
        await storage.delete_many(["u/a"])
    assert storage._batch_ok is True


async def test_close_then_reuse_reconnects(storage):
    await storage.put("k", b"1")
    await storage.close()
    assert storage._client is None
    assert (await storage.get("k")).data == b"1"


def test_a_storage_used_from_two_event_loops(azure_url):
    st = AzureStorage(azure_url)
    asyncio.run(st.put("k", b"1"))
    assert asyncio.run(st.get("k")).data == b"1"  # a new loop: a new client, the old one released
    asyncio.run(st.close())


# -- server clock -----------------------------------------------------------------------


async def test_clock_offset_is_near_zero_against_azurite(storage):
    assert storage.clock_offset == 0.0
    for i in range(3):
        await storage.put(f"c{i}", b"")
    assert abs(storage.clock_offset) < 1.0
    assert storage._clock.bounds is not None


def test_clock_offset_follows_a_skewed_server_and_a_jump():
    clock = ServerClock()

    def observe(server: float, t0: float, t1: float) -> None:
        clock.observe(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(server)), t0, t1)

    now = 1_800_000_000.0
    for i, frac in enumerate((0.1, 0.4, 0.68, 0.72, 0.95)):
        local = now + 10 * i + frac
        observe(int(local + 100.3), local - 0.01, local + 0.01)
    assert abs(clock.offset - 100.3) < 0.1
    observe(now + 50 - 5, now + 50, now + 50.02)  # the server clock stepped back 105 s
    assert abs(clock.offset - (-4.5)) < 0.6
    clock.observe(None, now, now)  # no Date: ignored
    assert abs(clock.offset - (-4.5)) < 0.6


# -- seen from outside: doctor ----------------------------------------------------------------


def test_qo_doctor_reports_the_backend_and_its_capabilities(azure_url):
    from qo.cli import build_cli

    result = CliRunner().invoke(build_cli(), ["doctor", "--url", azure_url])
    assert result.exit_code == 0, result.output
    out = result.output
    for line in ("create-only", "compare-and-swap", "list", "conditional delete"):
        assert line in out
    assert "batch delete" in out and "yes" in out.split("batch delete", 1)[1].splitlines()[0]
    assert "page size" in out and "5000" in out
    assert "clock" in out
    assert DEVSTORE_KEY not in out


async def test_qo_doctor_on_a_service_refusing_deletes_inside_batches(storage, monkeypatch):
    from qo.doctor import run_checks

    fake_batch(monkeypatch, lambda name: (400, "InvalidInput"))  # Azurite 3.35.0
    checks = {c.name: c for c in await run_checks(storage)}
    batch = checks["capability: batch delete"]
    # the call deleted them (one by one inside the plugin), and doctor says how
    assert batch.ok and batch.detail.startswith("yes (proven: 3 objects deleted in one call, which took")
    assert "one by one" in batch.detail
    assert "cleanup" not in checks and all(c.ok for c in checks.values() if c.required)
    assert await storage.list("_doctor/") == []
