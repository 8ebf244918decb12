"""The S3 backend learns how a store answers conditional requests, declares it, and
refuses a store that cannot be safe (issue 27).

Each store's way is simulated here on moto by a WSGI middleware (RGW 16's unquoted
If-Match and ignored conditional DELETE, LocalStack's 501 to it, a 500 to a CAS, a
store with no conditions at all); tests/test_real_s3.py runs the real servers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import attrs
import pytest
from click.testing import CliRunner

import qo
from qo.errors import InvalidInput
from qo.storage import NotFound, PreconditionFailed, StorageUnavailable
from qo.testing.moto import MotoServer
from qo_s3.dialect import DIALECT_KEY, PRESETS, Dialect, UnsafeStore, parse_dialect
from qo_s3.storage import S3Storage


@attrs.define
class Mimic:
    """What the simulated store does differently from S3 (mutable between tests)."""

    if_match: str = "quoted"  #: ``unquoted``: refuse a quoted If-Match, compare unquoted (RGW 16)
    delete: str = "honoured"  #: ``ignored`` (RGW 16) or ``refused`` (LocalStack: 501)
    if_none_match: bool = True  #: False: drop If-None-Match (create-only overwrites)
    cas_errors: int = 0  #: answer this many CAS PUTs with HTTP 500, not passing them on
    deny_reserved: bool = False  #: 403 AccessDenied to every request for a key under _qo/
    requests: int = 0


def _answer(start_response: Callable, status: str, code: str) -> list[bytes]:
    body = f"<Error><Code>{code}</Code><Message>simulated</Message></Error>".encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


def mimic_middleware(mimic: Mimic) -> Callable:
    def wrap(app: Callable) -> Callable:
        def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
            mimic.requests += 1
            if mimic.deny_reserved and "/_qo/" in environ.get("PATH_INFO", ""):
                return _answer(start_response, "403 Forbidden", "AccessDenied")
            method, if_match = environ["REQUEST_METHOD"], environ.get("HTTP_IF_MATCH")
            if method == "DELETE" and if_match is not None and mimic.delete != "honoured":
                if mimic.delete == "refused":
                    return _answer(start_response, "501 Not Implemented", "NotImplemented")
                environ.pop("HTTP_IF_MATCH")
            elif if_match is not None and mimic.if_match == "unquoted":
                if if_match.startswith('"'):
                    return _answer(start_response, "412 Precondition Failed", "PreconditionFailed")
                environ["HTTP_IF_MATCH"] = f'"{if_match}"'  # moto compares quoted
            if method == "PUT" and if_match is not None and mimic.cas_errors > 0:
                mimic.cas_errors -= 1
                return _answer(start_response, "500 Internal Server Error", "InternalError")
            if not mimic.if_none_match:
                environ.pop("HTTP_IF_NONE_MATCH", None)
            return app(environ, start_response)

        return wrapped

    return wrap


@pytest.fixture(scope="module")
def mimic_server():
    mimic = Mimic()
    server = MotoServer(bucket="qo-mimic", middleware=mimic_middleware(mimic))
    server.start()
    server.mimic = mimic
    yield server
    server.stop()


@pytest.fixture
def mimic(mimic_server) -> Mimic:
    mimic_server.mimic.__init__()  # every test starts from S3's behaviour
    return mimic_server.mimic


@pytest.fixture
async def open_s3(mimic_server):
    opened: list[S3Storage] = []

    def make(query: str = "", *, url: str | None = None) -> S3Storage:
        st = S3Storage((url or mimic_server.new_bucket(prefix="p")) + query)
        opened.append(st)
        return st

    yield make
    for st in opened:
        await st.close()


async def test_the_dialect_of_s3_is_learned_once_and_kept_in_the_bucket(open_s3, mimic):
    first = open_s3()
    assert first.dialect is None and first.conditional_delete is False  # unknown yet: not promised
    etag = await first.put("k", b"1", if_none_match=True)
    assert first.dialect == attrs.evolve(PRESETS["aws"], source="probed")
    assert first.conditional_delete is True
    second = open_s3(url=f"s3://{first.bucket}/p?endpoint_url={first.endpoint_url}&region=us-east-1")
    before = mimic.requests
    await second.put("k", b"2", if_match=etag)
    assert second.dialect is not None and second.dialect.source == "stored"
    assert mimic.requests - before == 2  # the kept dialect's GET, then the CAS: no probe
    # the backend's own keys are neither listed to the engine nor left behind by the probe
    assert [e.key for e in await second.list("")] == ["k"]
    assert [e.key for e in await second.list("_qo/")] == [DIALECT_KEY]


async def test_rgw_style_unquoted_if_match_is_learned_and_used(open_s3, mimic):
    mimic.if_match, mimic.delete = "unquoted", "ignored"
    declared_aws = open_s3("&dialect=aws")  # what the backend did before: every CAS refused
    etag = await declared_aws.put("k", b"1")
    with pytest.raises(PreconditionFailed):
        await declared_aws.put("k", b"2", if_match=etag)
    st = open_s3()
    etag = await st.put("k", b"1")
    new = await st.put("k", b"2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        await st.put("k", b"3", if_match=etag)
    assert (await st.get("k")).data == b"2" and st.dialect.if_match == "unquoted"
    assert st.dialect.delete == "ignored" and st.conditional_delete is False
    await st.delete("k", if_match=new)
    with pytest.raises(NotFound):
        await st.get("k")


async def test_localstack_style_501_to_a_conditional_delete_is_declared_and_avoided(open_s3, mimic):
    mimic.delete = "refused"
    st = open_s3()
    etag = await st.put("k", b"1", if_none_match=True)
    assert st.dialect.delete == "refused" and st.conditional_delete is False
    await st.delete("k", if_match=etag)  # a plain delete: no 501 reaches the engine
    await st.delete("missing", if_match=etag)
    with pytest.raises(NotFound):
        await st.get("k")


async def test_a_500_to_a_conditional_write_is_an_unknown_outcome(open_s3, mimic):
    st = open_s3()
    etag = await st.put("k", b"1", if_none_match=True)  # learns the dialect first
    mimic.cas_errors = 1
    with pytest.raises(StorageUnavailable, match="unknown outcome"):
        await st.put("k", b"2", if_match=etag)
    assert (await st.get("k")).data == b"1"  # the engine re-reads: here it did not land
    await st.put("k", b"2", if_match=etag)


async def test_a_store_without_conditions_is_refused_at_first_use_in_one_line():
    with MotoServer(bucket="qo-lax", ignore_conditions=True) as server:  # s3rver: every racer wins
        st = S3Storage(server.new_bucket("p"))
        try:
            await _refused(st, "a compare-and-swap on a stale etag succeeded")
        finally:
            await st.close()


async def test_a_store_whose_create_only_overwrites_is_refused(open_s3, mimic):
    mimic.if_none_match = False
    await _refused(open_s3(), "a create-only write overwrote an existing object")


async def _refused(st: S3Storage, says: str) -> None:
    with pytest.raises(UnsafeStore) as info:
        await st.put("q/tasks/t1", b"x", if_none_match=True)
    message = str(info.value)
    assert says in message and "unsafe=1" in message and "\n" not in message
    assert [e.key for e in await st.list("")] == []  # the task was never written
    forced = S3Storage(f"s3://{st.bucket}/p?endpoint_url={st.endpoint_url}&unsafe=1")
    try:
        await forced.put("q/tasks/t1", b"x", if_none_match=True)  # forced: used as it is
    finally:
        await forced.close()


async def test_credentials_that_cannot_reach_the_probe_prefix_are_told_how_to_do_without(open_s3, mimic):
    mimic.deny_reserved = True
    st = open_s3()
    with pytest.raises(qo.StorageError, match="dialect=aws") as info:
        await st.put("k", b"1", if_none_match=True)
    assert "_qo/" in str(info.value) and "access denied" in str(info.value)
    declared = open_s3("&dialect=aws")
    await declared.put("k", b"1", if_none_match=True)  # declared: nothing probed, it works


async def test_connect_and_submit_refuse_a_store_without_conditions():
    with MotoServer(bucket="qo-nocas", ignore_conditions=True) as server:
        queue = await qo.connect(server.new_bucket("p"), queue="q")
        try:
            with pytest.raises(UnsafeStore, match="cannot be used safely"):
                await queue.submit("t", {"x": 1})
        finally:
            await queue.close()


def test_doctor_prints_the_dialect_and_what_a_refused_delete_means(mimic_server, mimic):
    from qo.cli import cli

    mimic.delete = "refused"
    result = CliRunner().invoke(cli, ["doctor", "--url", mimic_server.new_bucket("p")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dialect: if_match:quoted,delete:refused,start_after:exact (probed)" in result.output
    line = next(x for x in result.output.splitlines() if "] conditional delete" in x)
    assert "refuses DELETE with If-Match" in line and "ignores" not in line, line


def test_doctor_does_not_call_the_clock_proven_when_no_request_was_answered(monkeypatch):
    from qo.cli import cli

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = CliRunner().invoke(cli, ["doctor", "--url", "s3://qo-nowhere/p?endpoint_url=http://127.0.0.1:9"],
                                catch_exceptions=False)
    assert result.exit_code == 1
    line = next(x for x in result.output.splitlines() if "server clock" in x)
    assert "[warn]" in line and "not proven" in line, result.output
    assert "[ok  ]" not in result.output.split("capability: conditional writes")[0], result.output


async def test_the_ascii_start_after_dialect_lists_the_right_keys(moto_server):
    st = S3Storage(moto_server.new_bucket("p") + "&dialect=localstack")
    try:
        for key in ["l/a", "l/z", "l/é", "l/日", "l/éa"]:
            await st.put(key, b"")
        assert [e.key for e in await st.list("l/", start_after="l/é")] == ["l/éa", "l/日"]
        assert [e.key for e in await st.list("l/", start_after="l/é", limit=1)] == ["l/éa"]
    finally:
        await st.close()


@pytest.mark.parametrize("value, expected", [
    ("aws", PRESETS["aws"]),
    ("rgw", Dialect(if_match="unquoted", delete="ignored")),
    ("if_match:unquoted,delete:refused", Dialect(if_match="unquoted", delete="refused")),
    ("probe", None),
])
def test_a_declared_dialect_is_parsed_from_the_url(value, expected):
    st = S3Storage(f"s3://bucket/p?dialect={value}")
    assert st.dialect == expected


@pytest.mark.parametrize("value", ["rgw17", "if_match:maybe", "delete", "unsafe:1"])
def test_a_bad_dialect_is_refused_naming_the_url(value):
    with pytest.raises(InvalidInput) as info:
        S3Storage(f"s3://bucket/p?dialect={value}")
    assert info.value.field == "url" and "dialect" in str(info.value)


def test_unsafe_must_be_a_flag():
    assert S3Storage("s3://bucket/p?unsafe=1").unsafe is True
    with pytest.raises(InvalidInput, match="unsafe"):
        S3Storage("s3://bucket/p?unsafe=maybe")


def test_a_kept_dialect_of_another_version_is_probed_again():
    assert Dialect.from_json(b'{"version": 0, "if_match": "quoted"}') is None
    assert Dialect.from_json(b"not json") is None
    assert Dialect.from_json(Dialect(delete="ignored").to_json()) == Dialect(delete="ignored", source="stored")
