"""Storage in one SQLite file: every object a row, every conditional write one statement.

Why a second local store: the directory store allocates an inode for every write (a
temp file renamed into place) and frees one, and that, not Python, is what a local task
costs on a disk filesystem. Here a write appends a page or two to SQLite's write-ahead
log, as huey's SqliteHuey does.

- create-only is an ``INSERT`` (a UNIQUE key: a second one fails, atomically across
  processes); a CAS is ``UPDATE ... WHERE key = ? AND etag = ?``; a conditional delete
  reads and deletes in one ``BEGIN IMMEDIATE`` transaction. SQLite serialises writers
  (one write lock per file); readers read a committed snapshot (WAL), never half a write.
- etags are the MD5 of the content, as S3 gives for single-part uploads and the
  directory store gives, so an object moved between stores keeps its etag.
- keys are stored as their UTF-8 bytes (``BLOB``): SQLite compares blobs with memcmp,
  which is S3's LIST order, and a prefix is a byte range.
- durability: ``synchronous=NORMAL`` (a committed write survives the process being
  killed; the last writes before a power loss may not, as with the directory store
  without ``fsync``); ``fsync=1`` gives ``synchronous=FULL``.
- connections: one per thread and process (a forked child opens its own; it never
  touches the parent's). The file is created 0600 (``mode="group"``: 0660), before
  SQLite opens it; its ``-wal`` and ``-shm`` files take the same mode.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

from qo.errors import ConfigurationError, InvalidInput
from qo.storage import (
    Blob,
    Entry,
    NotFound,
    PreconditionFailed,
    StorageBusy,
    StorageError,
    StorageUnavailable,
    check_put,
    validate_key,
    validate_prefix,
)

from .storage import MODES, _etag, _flag, _storage_error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key BLOB PRIMARY KEY,
    etag TEXT NOT NULL,
    modified REAL NOT NULL,
    data BLOB NOT NULL
) WITHOUT ROWID
"""
#: how long an operation waits for another connection's lock before StorageBusy
BUSY_TIMEOUT = 30.0
#: how long an operation waits once a lock has outlasted a whole busy_timeout and no
#: call has got through since: it is likely held for good (a backup, a forgotten shell)
HELD_PATIENCE = 1.0
#: the columns as the contract's types whatever a row written by hand holds (the file
#: may hold anything): bytes, a text etag, a float or None; a key of another type than
#: BLOB sorts outside every range queried, so it is never seen
_READ = "CAST(data AS BLOB), CAST(etag AS TEXT)"
_LISTED = ("key, CAST(etag AS TEXT), CASE WHEN typeof(data) = 'blob' THEN length(data) "
           "ELSE length(CAST(data AS BLOB)) END, "
           "CASE WHEN typeof(modified) IN ('real', 'integer') THEN modified END")
_BATCH = 500  # keys per DELETE ... IN (...) statement (SQLite allows 32,766 variables)


def _storage_errors(method: Any) -> Any:
    """Turn an sqlite3 or OS error escaping ``method`` into StorageUnavailable (busy,
    locked, full: transient) or StorageError, naming the file and the key. A lock held
    by another connection is waited for up to the store's patience, then ``StorageBusy``."""

    @functools.wraps(method)
    async def wrapper(self: SqliteStorage, *args: Any, **kwargs: Any) -> Any:
        key = args[0] if args and isinstance(args[0], str) else None
        started = None
        while True:
            try:
                result = await method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise self._error(exc, key) from None
                now = time.monotonic()
                if started is None:
                    started = now
                elif now - started >= self._patience():
                    raise self._busy_error(key, now - started) from None
                # blocking, as the directory store blocks on flock: the holder commits in
                # microseconds, and an await would let this loop start more writes meanwhile
                time.sleep(_pause(now - started))  # noqa: ASYNC251
            except (sqlite3.Error, OSError) as exc:
                raise self._error(exc, key) from None
            except (NotFound, PreconditionFailed):
                self._held = False  # the call got through: no lock stands in the way
                raise
            else:
                self._held = False
                return result

    return wrapper


def _pause(waited: float) -> float:
    """Seconds to sleep before trying a locked database again: a few hundred microseconds
    while the holder is likely mid-commit, then a few milliseconds (no spinning through a
    long wait)."""
    return random.uniform(0.00005, 0.0003) if waited < 0.05 else random.uniform(0.002, 0.01)


#: result codes a later try may not meet: another writer, out of memory, space or I/O
_TRANSIENT_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_FULL,
                    sqlite3.SQLITE_IOERR}


def _busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class SqliteStorage:
    """Storage in one SQLite database file (``sqlite:///path/to/queue.db``)."""

    name = "sqlite"

    def __init__(self, path: str, *, fsync: bool | str = False, mode: str = "private",
                 busy_timeout: float | str = BUSY_TIMEOUT, allow_foreign_root: bool | str = False):
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InvalidInput("url", "an sqlite path must be non-empty and contain no NUL")
        self.path = os.path.abspath(os.path.expanduser(path))
        self.fsync = _flag(fsync, "fsync")
        self._allow_foreign = _flag(allow_foreign_root, "allow_foreign_root")
        if mode not in MODES:
            raise InvalidInput("mode", f"{str(mode)[:40]!r} is not one of: {', '.join(MODES)}")
        self.mode = mode
        try:
            self.busy_timeout = float(busy_timeout)
        except (TypeError, ValueError):
            raise InvalidInput("busy_timeout", f"{str(busy_timeout)[:40]!r} is not a number of seconds") from None
        if not 0 < self.busy_timeout <= 3600:
            raise InvalidInput("busy_timeout", f"{self.busy_timeout:g} is not from 0 to 3600 seconds")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []  # every thread's, to close; this process's only
        self._conns_pid = os.getpid()
        self._ready_lock = threading.Lock()
        self._ready = False
        #: a lock outlasted a whole busy_timeout and no call has got through since
        self._held = False

    def __repr__(self) -> str:
        return f"SqliteStorage({self.path!r})"

    # -- connections --------------------------------------------------------------

    def _db(self, create: bool) -> sqlite3.Connection | None:
        """This thread's connection (opened on first use, after a fork anew); None when
        the file does not exist and ``create`` is False (reads of no store find nothing)."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid():
            return conn
        if not self._ready and not self._prepare(create):
            return None
        # a connection inherited through fork is left alone (closing it could touch
        # the parent's locks); this process opens its own
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None,
                               check_same_thread=False, cached_statements=64)
        conn.execute("PRAGMA synchronous=" + ("FULL" if self.fsync else "NORMAL"))
        conn.execute("PRAGMA mmap_size=268435456")
        local.conn, local.pid = conn, os.getpid()
        with self._ready_lock:
            if self._conns_pid != os.getpid():
                self._conns, self._conns_pid = [], os.getpid()  # the parent's stay open, untouched
            self._conns.append(conn)
        return conn

    def _prepare(self, create: bool) -> bool:
        """Create the file (with the store's mode, before SQLite opens it) and its table,
        in WAL mode; False if it does not exist and ``create`` is False."""
        with self._ready_lock:
            if self._ready:
                return True
            file_mode, dir_mode = MODES[self.mode]
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                if not create:
                    return False
                parent = os.path.dirname(self.path)
                if not os.path.isdir(parent):
                    os.makedirs(parent, mode=dir_mode, exist_ok=True)
                    os.chmod(parent, dir_mode)  # whatever the umask; group: setgid, as the directory store
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
                except FileExistsError:
                    pass
                else:  # the mode asked for, whatever the umask (SQLite gives it to -wal and -shm)
                    try:
                        os.fchmod(fd, file_mode)
                    finally:
                        os.close(fd)
                st = os.lstat(self.path)
            if stat.S_ISLNK(st.st_mode):
                if not self._allow_foreign:
                    raise ConfigurationError(
                        f"url: the sqlite store {self.path} is a symbolic link; whoever can change it decides "
                        "where task data goes. Use its target, or allow it with allow_foreign_root=1")
                st = os.stat(self.path)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigurationError(f"url: the sqlite store {self.path} is not a file")
            if st.st_uid != os.geteuid() and not self._allow_foreign:
                raise ConfigurationError(
                    f"url: the sqlite store {self.path} is owned by uid {st.st_uid}, not by this process's user "
                    f"(uid {os.geteuid()}); its owner can read every task and plant new ones. Use a file of "
                    "your own, or allow it with allow_foreign_root=1 (the other members of a group store need it)")
            self._set_up()
            self._ready = True
            return True

    def _set_up(self) -> None:
        """Put the file in WAL mode and give it the objects table, unless done. Processes
        opening a new store at once wait for each other (up to ``busy_timeout``); a
        database with tables of its own is refused, never written into."""
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            patience = self._patience()
            conn = sqlite3.connect(self.path, timeout=max(0.0, min(patience - waited, 1.0)), isolation_level=None)
            try:
                tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables and "objects" not in tables:
                    raise ConfigurationError(
                        f"url: {self.path} is an SQLite database, but not a qo store (it has other tables)")
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal" or \
                        conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                    if "objects" not in tables:
                        conn.execute(_SCHEMA)
                    return
                if time.monotonic() - started >= patience:  # the mode stays as it was: another process holds the file
                    raise StorageError(f"{self.path}: cannot put the file in SQLite's write-ahead-log mode",
                                       backend=self.name)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise ConfigurationError(f"url: {self.path} is not a qo sqlite store: {exc}") from None
                if time.monotonic() - started >= patience:
                    raise self._busy_error(None, time.monotonic() - started) from None
            except sqlite3.DatabaseError as exc:
                raise ConfigurationError(f"url: {self.path} is not a qo sqlite store: {exc}") from None
            finally:
                conn.close()
            time.sleep(random.uniform(0.001, 0.005))  # another process is setting the file up

    def _patience(self) -> float:
        """How long a call waits for another connection's lock: ``busy_timeout``, or at
        most ``HELD_PATIENCE`` while a lock that outlasted a whole timeout may still be
        held (no call got through since), so a command of several calls waits about
        ``busy_timeout`` in all, not once per call."""
        return min(self.busy_timeout, HELD_PATIENCE) if self._held else self.busy_timeout

    def _busy_error(self, key: str | None, waited: float) -> StorageBusy:
        """A lock held by another connection for ``waited`` seconds: given up."""
        self._held = True
        return StorageBusy(f"{self.path} is locked by another connection; gave up after {waited:.1f} s "
                           f"(busy_timeout={self.busy_timeout:g})", backend=self.name, key=key)

    def _error(self, exc: BaseException, key: str | None) -> StorageError:
        if isinstance(exc, OSError):
            return _storage_error(exc, self.name, key)
        transient = getattr(exc, "sqlite_errorcode", 0) & 0xFF in _TRANSIENT_CODES
        cls = StorageUnavailable if transient else StorageError
        return cls(f"{self.path}: {exc or type(exc).__name__}", backend=self.name, key=key)

    # -- the contract -------------------------------------------------------------

    @_storage_errors
    async def get(self, key: str) -> Blob:
        validate_key(key)
        conn = self._db(create=False)
        row = None if conn is None else conn.execute(
            f"SELECT {_READ} FROM objects WHERE key = ?", (key.encode(),)).fetchone()
        if row is None:
            raise NotFound("no such key", backend=self.name, key=key)
        return Blob(row[0], row[1])

    @_storage_errors
    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        validate_key(key)
        data = check_put(data, if_match, if_none_match)
        conn = self._db(create=True)
        etag, row = _etag(data), (key.encode(),)
        if if_none_match:
            try:
                conn.execute("INSERT INTO objects (key, etag, modified, data) VALUES (?, ?, ?, ?)",
                             (row[0], etag, time.time(), data))
            except sqlite3.IntegrityError:
                raise PreconditionFailed("key exists", backend=self.name, key=key) from None
        elif if_match is not None:
            done = conn.execute("UPDATE objects SET etag = ?, modified = ?, data = ? WHERE key = ? AND etag = ?",
                                (etag, time.time(), data, row[0], if_match)).rowcount
            if not done:
                raise PreconditionFailed("etag changed or key missing", backend=self.name, key=key)
        else:
            conn.execute("INSERT INTO objects (key, etag, modified, data) VALUES (?, ?, ?, ?) ON CONFLICT (key) "
                         "DO UPDATE SET etag = excluded.etag, modified = excluded.modified, data = excluded.data",
                         (row[0], etag, time.time(), data))
        return etag

    @_storage_errors
    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        validate_key(key)
        conn = self._db(create=False)
        if conn is None:
            return
        if if_match is None:
            conn.execute("DELETE FROM objects WHERE key = ?", (key.encode(),))
            return
        with _immediate(conn):  # read and delete as one: no version may come between
            row = conn.execute("SELECT etag FROM objects WHERE key = ?", (key.encode(),)).fetchone()
            if row is None:
                return
            if row[0] != if_match:
                raise PreconditionFailed("etag changed", backend=self.name, key=key)
            conn.execute("DELETE FROM objects WHERE key = ?", (key.encode(),))

    @_storage_errors
    async def delete_many(self, keys: list[str]) -> None:
        """Delete ``keys`` in one transaction (missing keys are fine)."""
        for key in keys:
            validate_key(key)
        conn = self._db(create=False)
        if conn is None or not keys:
            return
        encoded = [k.encode() for k in keys]
        with _immediate(conn):
            for i in range(0, len(encoded), _BATCH):
                chunk = encoded[i : i + _BATCH]
                conn.execute(f"DELETE FROM objects WHERE key IN ({','.join('?' * len(chunk))})", chunk)

    @_storage_errors
    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        validate_prefix(prefix)
        conn = self._db(create=False)
        if conn is None or limit <= 0:
            return []
        low, high = prefix.encode(), _after_prefix(prefix.encode())
        after = start_after.encode() if start_after is not None and start_after.encode() >= low else None
        out: list[Entry] = []
        while len(out) < limit:
            sql, args = ("key > ?", [after]) if after is not None else ("key >= ?", [low])
            if high is not None:
                sql += " AND key < ?"
                args.append(high)
            want = limit - len(out)
            rows = conn.execute(f"SELECT {_LISTED} FROM objects WHERE {sql} ORDER BY key LIMIT ?",
                                [*args, want]).fetchall()
            for key, etag, size, modified in rows:
                try:
                    out.append(Entry(key.decode(), etag, size, modified))
                except UnicodeDecodeError:  # no S3 key: a row written by hand; listed past, not returned
                    pass
            if len(rows) < want:  # the range is exhausted
                break
            after = rows[-1][0]  # a page of skipped rows goes on after them, never ends the listing
        return out

    async def close(self) -> None:
        with self._ready_lock:
            conns = self._conns if self._conns_pid == os.getpid() else []
            self._conns, self._local = [], threading.local()
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction taken at its start (``BEGIN IMMEDIATE``: busy now, not half-way)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # (a failed COMMIT too: the next call starts clean)
            conn.execute("ROLLBACK")
        raise


def _after_prefix(prefix: bytes) -> bytes | None:
    """The least byte string above every string starting with ``prefix`` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
