"""qo on S3 servers nobody here wrote: Ceph RGW 16.2 and LocalStack 4.x, started by the tests
(qo/testing/s3_servers.py). The storage conformance kit runs whole on each, but for the
slowest tests, which run on one of the two (``ONE_SERVER``) to keep the suite short."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("qo.testing.conformance")

from qo.testing import ConformanceTests, StorageFixtures  # noqa: E402

#: test -> the one real server it runs on: Ceph for the process races (RGW answers some
#: lost CAS races with HTTP 500, the case the kit must survive) and for the 1100-key
#: paging; each takes 15-20 s a server on 2 cores. LocalStack runs the races as tasks.
ONE_SERVER = {
    "test_create_only_race_has_exactly_one_winner[processes": "ceph",
    "test_cas_race_loses_no_update[processes": "ceph",
    "test_list_pages_through_more_than_a_thousand_keys": "ceph",
}


class TestRealS3Conformance(StorageFixtures, ConformanceTests):
    """The whole storage contract on each real server (a fresh bucket per test)."""

    @pytest.fixture
    def storage_url(self, request: pytest.FixtureRequest, real_s3_server) -> str:
        import uuid

        server = request.node.callspec.params["real_s3_server"]
        for name, only in ONE_SERVER.items():
            if request.node.name.startswith(name) and server != only:
                pytest.skip(f"slow: runs on {only} only (tests/test_real_s3.py ONE_SERVER)")
        return real_s3_server.new_bucket(prefix=f"t-{uuid.uuid4().hex[:8]}")


def test_s3rver_which_honours_no_condition_is_refused_at_first_use_in_one_line():
    """s3rver (npm) ignores If-None-Match and If-Match: every racer would win."""
    import asyncio
    import os

    from qo.testing.s3rver import MISSING, S3rver, find_s3rver
    from qo_s3.dialect import UnsafeStore
    from qo_s3.storage import S3Storage

    if find_s3rver() is None:
        if os.environ.get("CI"):
            pytest.fail(f"{MISSING} (CI is set: python3 dev.py installs it)", pytrace=False)
        pytest.skip(MISSING)

    async def first_use(url: str) -> str:
        storage = S3Storage(url, **server.options)
        try:
            with pytest.raises(UnsafeStore) as info:
                await storage.put("q/tasks/t1", b"{}", if_none_match=True)
            return str(info.value)
        finally:
            await storage.close()

    with S3rver() as server:
        message = asyncio.run(first_use(server.url("p")))
    assert "cannot be used safely: a compare-and-swap on a stale etag succeeded" in message
    assert "unsafe=1" in message and "\n" not in message
