"""The one-file local store (``sqlite://``, qo_local.sqlite_storage): the conformance
kit with its process races, then the engine's own multi-process tests run on it (their
functions are imported here, so this module's ``backend`` fixture gives them sqlite),
then what is its own: URLs, file modes, a busy database, a forked child."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from typing import Any

import pytest

pytest.register_assert_rewrite("qo.testing.conformance")

from test_chaos import (
    test_chaos_producers_killed_workers_and_schedulers_poison_and_storage_faults,  # noqa: F401
)

# the engine's process races, SIGKILLs and chaos, on this store as on the others
from test_cli import test_submit_then_status  # noqa: F401
from test_packs import (  # noqa: F401
    test_a_sigkilled_holder_s_pack_finishes_elsewhere_without_rerunning_what_was_stored,
    test_four_worker_processes_run_each_task_of_2000_in_packs_exactly_once,
)
from test_recovery import (
    test_a_producer_failing_between_its_writes_leaves_no_task_and_no_duplicate,  # noqa: F401
)
from test_worker_processes import (  # noqa: F401
    test_eight_worker_processes_run_each_task_exactly_once,
    test_sigkilled_worker_task_completes_elsewhere_after_lease,
)

import qo
from qo.backends import open_storage
from qo.testing import ConformanceTests, StorageFixtures


@pytest.fixture(params=["sqlite"])
def backend(request) -> str:
    """Every storage-facing test of this module runs on the one-file store only."""
    return request.param


class TestSqliteBackend(StorageFixtures, ConformanceTests):
    """The whole storage contract, races between processes included."""

    @pytest.fixture
    def storage_url(self, tmp_path) -> str:
        return "sqlite://" + str(tmp_path / "store.db")


# -- URLs and options --------------------------------------------------------------------


def test_an_sqlite_url_opens_the_file_it_names(tmp_path) -> None:
    storage = open_storage("sqlite://" + str(tmp_path / "a" / "q.db") + "?fsync=1&busy_timeout=2.5")
    assert type(storage).__name__ == "SqliteStorage"
    assert storage.path == str(tmp_path / "a" / "q.db")
    assert storage.fsync is True and storage.busy_timeout == 2.5
    assert open_storage("sqlite://localhost" + str(tmp_path / "q.db")).path == str(tmp_path / "q.db")


@pytest.mark.parametrize("url, field, words", [
    ("sqlite://db.example.com{d}/q.db", "url", "not host 'db.example.com'"),
    ("sqlite://{d}/dir/", "url", "names a file"),
    ("sqlite://{d}/q.db?lock_stripes=4", "url", "unknown query parameter 'lock_stripes'"),
    ("sqlite://{d}/q.db?busy_timeout=soon", "busy_timeout", "not a number"),
    ("sqlite://{d}/q.db?busy_timeout=0", "busy_timeout", "from 0 to 3600"),
    ("sqlite://{d}/q.db?fsync=maybe", "fsync", "not one of"),
    ("sqlite://{d}/q.db?mode=world", "mode", "not one of"),
])
def test_a_bad_sqlite_url_names_its_field_and_creates_nothing(tmp_path, url, field, words) -> None:
    with pytest.raises(qo.InvalidInput) as info:
        open_storage(url.format(d=tmp_path))
    assert info.value.field == field and words in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_storage_options_are_named(tmp_path) -> None:
    with pytest.raises(qo.InvalidInput, match="unknown sqlite storage options: lock_stripes"):
        open_storage("sqlite://" + str(tmp_path / "q.db"), {"lock_stripes": 4})


# -- the file ------------------------------------------------------------------------------


async def test_reading_a_store_that_does_not_exist_creates_nothing(tmp_path) -> None:
    path = tmp_path / "none" / "q.db"
    storage = open_storage("sqlite://" + str(path))
    with pytest.raises(qo.NotFound):
        await storage.get("a")
    assert await storage.list("") == []
    await storage.delete("a")
    await storage.delete_many(["a", "b"])
    assert not path.parent.exists()
    await storage.put("a", b"1")
    assert path.exists()
    await storage.close()


@pytest.mark.parametrize("mode, file_mode", [("private", 0o600), ("group", 0o660)])
async def test_the_file_and_its_log_are_created_with_the_store_mode(tmp_path, mode, file_mode) -> None:
    old = os.umask(0o022)  # a umask that would open the file to others, or close it to the group
    try:
        storage = open_storage("sqlite://" + str(tmp_path / "q.db"), {"mode": mode})
        await storage.put("secret", b"token")
    finally:
        os.umask(old)
    for name in ("q.db", "q.db-wal", "q.db-shm"):  # SQLite gives its -wal and -shm the file's mode
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == file_mode, name
    await storage.close()


async def test_a_symbolic_link_or_a_file_that_is_not_a_store_is_refused(tmp_path) -> None:
    (tmp_path / "real.db").write_bytes(b"")
    os.symlink(tmp_path / "real.db", tmp_path / "link.db")
    with pytest.raises(qo.ConfigurationError, match="is a symbolic link"):
        await open_storage("sqlite://" + str(tmp_path / "link.db")).put("a", b"1")
    (tmp_path / "notes.txt").write_text("not a database, but some notes\n" * 200)
    with pytest.raises(qo.ConfigurationError, match="is not a qo sqlite store"):
        await open_storage("sqlite://" + str(tmp_path / "notes.txt")).get("a")
    assert (tmp_path / "notes.txt").read_text().startswith("not a database")


async def test_a_link_or_another_users_file_opens_only_when_allowed(tmp_path) -> None:
    path = tmp_path / "q.db"
    mine = open_storage("sqlite://" + str(path))
    await mine.put("k", b"v")
    await mine.close()
    os.symlink(path, tmp_path / "link.db")
    storage = open_storage(f"sqlite://{tmp_path}/link.db?allow_foreign_root=1")
    assert (await storage.get("k")).data == b"v"
    await storage.close()
    if os.geteuid() != 0:
        return  # (chown to another user needs root)
    os.chown(path, 65534, 65534)
    with pytest.raises(qo.ConfigurationError) as err:
        await open_storage("sqlite://" + str(path)).get("k")
    assert "uid 65534" in str(err.value) and "allow_foreign_root=1" in str(err.value)
    storage = open_storage("sqlite://" + str(path), {"allow_foreign_root": True})  # a group store's other members
    assert (await storage.get("k")).data == b"v"
    await storage.close()


async def test_a_group_store_s_new_directory_is_setgid_and_group_writable(tmp_path) -> None:
    old = os.umask(0o077)
    try:
        storage = open_storage(f"sqlite://{tmp_path}/shared/q.db?mode=group")
        await storage.put("k", b"v")
        await storage.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o2770
    assert stat.S_IMODE(os.stat(tmp_path / "shared" / "q.db").st_mode) == 0o660


async def test_an_sqlite_database_of_something_else_is_refused_and_left_as_it_was(tmp_path) -> None:
    other = sqlite3.connect(tmp_path / "app.db")
    other.execute("CREATE TABLE users (name TEXT)")
    other.commit()
    other.close()
    with pytest.raises(qo.ConfigurationError, match="an SQLite database, but not a qo store"):
        await open_storage("sqlite://" + str(tmp_path / "app.db")).put("a", b"1")
    check = sqlite3.connect(tmp_path / "app.db")
    assert [r[0] for r in check.execute("SELECT name FROM sqlite_master")] == ["users"]
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    check.close()


ROUNDS = 20


def _open_and_write(base: str, index: int, barrier: Any, results: Any) -> None:
    """In each round, with the 7 others: open a new store and write to it."""

    async def go(url: str) -> bool:
        storage = open_storage(url)
        try:
            await storage.put(f"own/{index}", b"x", if_none_match=True)
            try:
                await storage.put("shared", str(index).encode(), if_none_match=True)
                return True
            except qo.PreconditionFailed:
                return False
        finally:
            await storage.close()

    for round_ in range(ROUNDS):
        barrier.wait(30)
        try:
            results.put((round_, asyncio.run(go(f"sqlite://{base}/new{round_}/q.db"))))
        except Exception as exc:  # noqa: BLE001 (reported to the test, which names it)
            results.put((round_, repr(exc)))


def test_eight_processes_opening_a_new_store_at_once_all_write(tmp_path) -> None:
    """The first open sets the file up (WAL mode, the table): the others wait for it
    rather than fail (they did, with "database is locked"); 8 processes, 20 new stores."""
    ctx = multiprocessing.get_context("forkserver")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_open_and_write, args=(str(tmp_path), i, barrier, results)) for i in range(8)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in range(8 * ROUNDS)]
    for p in procs:
        p.join(10)
    assert all(isinstance(won, bool) for _, won in outcomes), [o for o in outcomes if not isinstance(o[1], bool)]
    assert all(sum(won for r, won in outcomes if r == round_) == 1 for round_ in range(ROUNDS))

    async def keys(url: str) -> list[str]:
        storage = open_storage(url)
        try:
            return [e.key for e in await storage.list("own/")]
        finally:
            await storage.close()

    assert asyncio.run(keys(f"sqlite://{tmp_path}/new{ROUNDS - 1}/q.db")) == sorted(f"own/{i}" for i in range(8))


async def test_a_write_that_waits_out_busy_timeout_is_transient_and_names_the_key(tmp_path) -> None:
    url = "sqlite://" + str(tmp_path / "q.db")
    storage = open_storage(url, {"busy_timeout": 0.2})
    await storage.put("a", b"1")
    holder = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer, holding the write lock
    try:
        with pytest.raises(qo.StorageUnavailable) as info:
            await storage.put("a", b"2")
        assert info.value.key == "a"
        assert (await storage.get("a")).data == b"1"  # reads go on beside a writer (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await storage.put("a", b"2")  # and the lock gone, writes do
    assert (await storage.get("a")).data == b"2"
    await storage.close()


async def test_a_writer_waiting_on_another_goes_on_when_it_commits(tmp_path) -> None:
    storage = open_storage("sqlite://" + str(tmp_path / "q.db"))
    await storage.put("a", b"1")
    holder = sqlite3.connect(tmp_path / "q.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE objects SET data = ?, etag = ? WHERE key = ?", (b"x", '"x"', b"a"))
    threading.Timer(0.05, lambda: holder.execute("COMMIT")).start()
    await storage.put("b", b"2")  # waits for the lock (as a file lock would, blocking), then writes
    assert (await storage.get("a")).data == b"x" and (await storage.get("b")).data == b"2"
    holder.close()
    await storage.close()


class _LockHeld:
    """Another connection's lock on ``path`` that is never released (until the test ends):
    a write transaction, with ``exclusive`` in SQLite's exclusive locking mode, so that
    readers wait too (a tool or shell that took the whole file; it takes it only while no
    other connection is open). A file not yet a store is held in its rollback-journal
    mode, so setting it up waits as well."""

    def __init__(self, path: Any, *, exclusive: bool = True):
        self.conn = sqlite3.connect(path, isolation_level=None)
        if exclusive:
            self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.conn.execute("BEGIN EXCLUSIVE")
        if exclusive and self.conn.execute("SELECT name FROM sqlite_master WHERE name = 'objects'").fetchone():
            self.conn.execute("DELETE FROM objects WHERE key = x'00'")  # the exclusive lock, taken now

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


async def _outcome(call: Any) -> tuple[BaseException | None, float]:
    """What ``call()`` raised and how long it took (its wait blocks: no wait_for can cut it)."""
    started = time.monotonic()
    try:
        await call()
    except Exception as exc:  # noqa: BLE001 (the test names what it expects)
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


async def test_a_lock_never_released_fails_every_call_at_busy_timeout_naming_the_file(tmp_path) -> None:
    """Issue 26: a lock held for good made callers wait for good. Each call gives up at
    ``busy_timeout`` with StorageBusy (a StorageUnavailable) naming the file and the key;
    set-up of a store not yet opened too; once the lock goes, every call works again."""
    path = tmp_path / "q.db"
    storage = open_storage(f"sqlite://{path}?busy_timeout=0.3")
    await storage.put("a", b"1")
    await storage.close()  # (its connection opens again on its next call)
    holder = _LockHeld(path)
    try:
        calls = {"get": (lambda: storage.get("a"), "a"), "put": (lambda: storage.put("a", b"2"), "a"),
                 "put_if_match": (lambda: storage.put("a", b"2", if_match="x"), "a"),
                 "delete": (lambda: storage.delete("a"), "a"),
                 "list": (lambda: storage.list("a/"), "a/"),  # (a listing names its prefix)
                 "delete_many": (lambda: storage.delete_many(["a", "b"]), None)}
        for what, (call, key) in calls.items():
            exc, took = await _outcome(call)
            assert isinstance(exc, qo.StorageBusy) and isinstance(exc, qo.StorageUnavailable), (what, exc)
            assert str(path) in str(exc) and "busy_timeout=0.3" in str(exc), (what, str(exc))
            assert exc.key == key, what
            assert took < 20, (what, took)  # gave up, not waiting for good (generous: a loaded machine)
        fresh = open_storage(f"sqlite://{path}", {"busy_timeout": 0.3})  # its set-up waits on the lock too
        exc, _ = await _outcome(lambda: fresh.list(""))
        assert isinstance(exc, qo.StorageBusy) and str(path) in str(exc), exc
    finally:
        holder.release()
    assert (await storage.get("a")).data == b"1"
    await storage.put("a", b"2")
    assert [e.key for e in await fresh.list("")] == ["a"]
    await storage.close()
    await fresh.close()


async def test_once_a_lock_outlasted_busy_timeout_the_next_calls_wait_a_second_until_one_gets_through(tmp_path) -> None:
    """A command of several calls on a store locked for good waits about busy_timeout in
    all, not once per call; a call that gets through gives the next ones the whole wait."""
    from qo_local.sqlite_storage import HELD_PATIENCE

    path = tmp_path / "q.db"
    storage = open_storage(f"sqlite://{path}?busy_timeout=3")
    await storage.put("a", b"1")
    await storage.close()
    holder = _LockHeld(path)
    try:
        first, took = await _outcome(lambda: storage.get("a"))
        assert isinstance(first, qo.StorageBusy) and took >= 3
        for call in (lambda: storage.put("a", b"2"), lambda: storage.list("")):
            exc, took = await _outcome(call)
            assert isinstance(exc, qo.StorageBusy) and HELD_PATIENCE <= took < 3, (exc, took)
    finally:
        holder.release()
    assert (await storage.get("a")).data == b"1"  # got through: the next lock is waited for in full
    await storage.close()
    holder = _LockHeld(path)
    try:
        exc, took = await _outcome(lambda: storage.put("a", b"2"))
        assert isinstance(exc, qo.StorageBusy) and took >= 3, (exc, took)
    finally:
        holder.release()
    await storage.close()


async def test_setting_up_a_new_file_held_by_another_connection_gives_up_naming_it(tmp_path) -> None:
    path = tmp_path / "new.db"
    holder = _LockHeld(path, exclusive=False)  # an empty database, its rollback journal locked
    try:
        storage = open_storage(f"sqlite://{path}?busy_timeout=0.3")
        exc, took = await _outcome(lambda: storage.put("a", b"1"))
        assert isinstance(exc, qo.StorageBusy) and str(path) in str(exc), exc
        assert took < 20
    finally:
        holder.release()
    await storage.put("a", b"1")
    assert (await storage.get("a")).data == b"1"
    await storage.close()


async def test_the_engine_does_not_retry_a_wait_the_store_already_waited_out(tmp_path) -> None:
    """busy_timeout is the whole wait of an operation: the engine's backoff, which tries
    a StorageUnavailable 8 times, tries a StorageBusy once (it waited 8 timeouts)."""
    from qo.counting import CountingStorage

    path = tmp_path / "q.db"
    q = await qo.connect(f"sqlite://{path}?busy_timeout=0.2", queue="q", wrap_storage=CountingStorage)
    task = await q.submit("t", 1)
    await q.storage.close()  # (its connection opens again on its next call)
    holder = _LockHeld(path)
    try:
        before = q.storage.counts()
        with pytest.raises(qo.StorageBusy, match=str(path)):
            await q.get(task.id)
        assert q.storage.counts()["GET"] - before["GET"] == 1
        with pytest.raises(qo.StorageBusy, match=str(path)):
            await q.submit("t", 2)
        assert q.storage.counts()["PUT_COND"] - before["PUT_COND"] <= 1
    finally:
        holder.release()
    assert (await q.get(task.id)).status == "pending"
    await q.close()


def test_qo_submit_on_a_store_locked_for_good_exits_1_with_one_line_naming_the_file(tmp_path) -> None:
    """The CLI gives up after about busy_timeout (here 3 s; it took 8 tries of every
    operation, 50 s and more, before): exit 1, one line naming the file, no traceback."""
    from test_cli import run_qo

    path = tmp_path / "q.db"
    url = f"sqlite://{path}?busy_timeout=3"
    assert run_qo("submit", "t", "--url", url, cwd=tmp_path).returncode == 0
    holder = _LockHeld(path)
    try:
        proc = run_qo("submit", "t", "--url", url, cwd=tmp_path, timeout=30)  # TimeoutExpired: still waiting
    finally:
        holder.release()
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


async def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(tmp_path) -> None:
    url = "sqlite://" + str(tmp_path / "q.db")
    storage = open_storage(url)
    await storage.put("parent", b"p")  # the parent's connection is open when it forks
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_child_writes_with(storage), args=(results,))
    child.start()
    assert results.get(timeout=30) == "p"
    child.join(10)
    assert child.exitcode == 0
    assert (await storage.get("child")).data == b"c"  # the parent's connection still works
    await storage.put("parent", b"q")
    assert (await storage.get("parent")).data == b"q"
    await storage.close()


def _child_writes_with(storage: Any):
    """A child body using the parent's storage object itself, as a forked worker would."""

    def body(results: Any) -> None:
        async def go() -> str:
            await storage.put("child", b"c", if_none_match=True)
            return (await storage.get("parent")).data.decode()

        results.put(asyncio.run(go()))

    return body


def _plant_rows(path, rows: list[tuple[Any, Any, Any, Any]]) -> None:
    """Rows written into the file by hand, as anything with the sqlite3 shell could."""
    raw = sqlite3.connect(path)
    raw.executemany("INSERT INTO objects (key, etag, modified, data) VALUES (?, ?, ?, ?)", rows)
    raw.commit()
    raw.close()


async def test_rows_written_by_hand_read_as_the_contract_s_types_or_not_at_all(tmp_path) -> None:
    storage = open_storage(f"sqlite://{tmp_path}/q.db")
    await storage.put("p/z", b"good")
    _plant_rows(tmp_path / "q.db", [
        *[(b"p/\xff" + bytes([i]), '"x"', 1.0, b"1") for i in range(5)],  # keys no S3 key can be
        (b"p/text", 7, "soon", "hello"),  # data as TEXT, etag as INTEGER, modified as TEXT
        ("p/a-text-key", '"y"', 1.0, b"1"),  # a TEXT key: outside every BLOB range
    ])
    listed = await storage.list("p/")
    assert [(e.key, e.etag, e.size, e.modified) for e in listed][:1] == [("p/text", "7", 5, None)]
    assert [e.key for e in listed] == ["p/text", "p/z"]
    # a page of undecodable keys does not end the listing: it goes on past them
    assert [e.key for e in await storage.list("p/", limit=1)] == ["p/text"]
    assert [e.key for e in await storage.list("p/", start_after="p/text", limit=2)] == ["p/z"]
    blob = await storage.get("p/text")
    assert (blob.data, blob.etag) == (b"hello", "7")
    await storage.close()


async def test_a_worker_drains_past_rows_written_by_hand_in_its_queue(tmp_path) -> None:
    from qo import keys
    from qo.worker import Worker

    url = f"sqlite://{tmp_path}/q.db"
    q = await qo.connect(url, queue="q")
    good = await q.submit("t", 1)
    ready = keys.ready_prefix("q")
    _plant_rows(tmp_path / "q.db", [
        (ready.encode() + b"\xff\xfe", '"x"', 1.0, b""),  # an undecodable marker key
        (f"{ready}0000garbage".encode(), 5, "x", 12345),  # a marker of nonsense
        (f"q/tasks/{good.id[:-1]}0.json".encode(), '"e"', 1.0, "{not json"),  # a task of TEXT garbage
    ])
    w = Worker(q, concurrency=2, poll_min=0.01, poll_max=0.05)
    w.handler("t")(lambda input: input + 1)
    await asyncio.wait_for(w.run(until_idle=True), 20)
    done = await q.get(good.id)
    assert (done.status, done.output) == ("completed", 2)
    await q.close()


async def test_keys_are_listed_in_byte_order_across_prefixes_that_are_also_keys(tmp_path) -> None:
    storage = open_storage("sqlite://" + str(tmp_path / "q.db"))
    for key in ["a", "a/b", "a/b/c", "a-b", "a\u00e9", "b", "a\U0001f600"]:
        await storage.put(key, key.encode())
    listed = [e.key for e in await storage.list("a")]
    assert listed == sorted(["a", "a/b", "a/b/c", "a-b", "a\u00e9", "a\U0001f600"], key=str.encode)
    assert [e.key for e in await storage.list("a/", start_after="a/b")] == ["a/b/c"]
    await storage.close()
