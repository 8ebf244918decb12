"""Filesystem storage with the same atomicity as S3 conditional writes.

- create-only: a fully written temp file is hard-linked into place; ``link`` fails if
  the name exists, atomically, across processes.
- CAS, unconditional put and delete: compare-and-replace under a per-key ``flock``
  (striped lock files), then an atomic ``rename``; readers never see partial data
  because a file is never modified in place.
- etags are the MD5 of the content, as S3 gives for single-part uploads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import uuid
import zlib
from contextlib import contextmanager
from typing import Iterator

from qo.errors import InvalidInput
from qo.storage import (
    Blob,
    Entry,
    NotFound,
    PreconditionFailed,
    StorageError,
    check_put,
    validate_key,
    validate_prefix,
)

_RESERVED = ".qo-"  # root-level names of our own (temp files, locks): not keys
_EMPTY_ETAG = '"' + hashlib.md5(b"").hexdigest() + '"'


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


class LocalStorage:
    """Storage in a directory tree: one file per key under ``root``."""

    name = "local"

    def __init__(self, root: str, *, fsync: bool | str = False, lock_stripes: int = 1024):
        if not isinstance(root, str) or not root or "\x00" in root:
            raise InvalidInput("url", "a local path must be non-empty and contain no NUL")
        try:
            os.fsencode(root)
        except UnicodeEncodeError:
            raise InvalidInput("url", "a local path must be encodable (no lone surrogates)") from None
        self.root = os.path.abspath(os.path.expanduser(root))
        self.fsync = fsync in (True, "1", "true", "yes")
        if isinstance(lock_stripes, bool) or not isinstance(lock_stripes, int) or not 1 <= lock_stripes <= 65536:
            raise InvalidInput("lock_stripes", f"{lock_stripes!r} is not an integer from 1 to 65536")
        self.lock_stripes = lock_stripes
        self._fds: dict[int, int] = {}
        self._fds_pid = os.getpid()
        self._thread_locks = [threading.Lock() for _ in range(64)]
        self._tmp = os.path.join(self.root, _RESERVED + "tmp")
        self._locks = os.path.join(self.root, _RESERVED + "locks")
        try:
            os.makedirs(self._tmp, exist_ok=True)
            os.makedirs(self._locks, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror}", backend=self.name) from None

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    # -- paths and locks ------------------------------------------------------

    def _path(self, key: str) -> str:
        validate_key(key)
        if key.startswith(_RESERVED):
            raise InvalidInput("key", f"names starting with {_RESERVED!r} are reserved")
        return os.path.join(self.root, *key.split("/"))

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Exclusive per-stripe lock: a thread lock inside this process, flock across processes.

        Lock files stay open (creating files is the slow part of a local write); a
        forked child reopens them, since an inherited descriptor shares the parent's lock.
        """
        stripe = zlib.crc32(key.encode()) % self.lock_stripes
        with self._thread_locks[stripe % len(self._thread_locks)]:
            fd = self._lock_fd(stripe)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_fd(self, stripe: int) -> int:
        if self._fds_pid != os.getpid():
            self._fds, self._fds_pid = {}, os.getpid()  # never close the parent's descriptors
        fd = self._fds.get(stripe)
        if fd is None:
            fd = os.open(os.path.join(self._locks, f"{stripe:04d}"), os.O_RDWR | os.O_CREAT, 0o644)
            self._fds[stripe] = fd
        return fd

    def _write_temp(self, data: bytes) -> str:
        tmp = os.path.join(self._tmp, uuid.uuid4().hex)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _read(self, path: str, key: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound("no such key", backend=self.name, key=key) from None

    def _parent(self, path: str, key: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StorageError("a prefix of this key is itself a key", backend=self.name, key=key) from None

    def _clear_empty_dir(self, path: str, key: str) -> None:
        """Remove the empty directory that deleted keys below ``key`` left at ``path``
        (it would make ``key`` look taken); StorageError if keys below it remain."""
        if not os.path.isdir(path) or os.path.islink(path):
            return
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise StorageError("a key below this one exists", backend=self.name, key=key) from None

    # -- the contract -------------------------------------------------------------

    async def get(self, key: str) -> Blob:
        data = self._read(self._path(key), key)
        return Blob(data, _etag(data))

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        path = self._path(key)
        data = check_put(data, if_match, if_none_match)
        self._parent(path, key)
        if if_match is None:  # CAS on an empty directory: "missing", PreconditionFailed below
            self._clear_empty_dir(path, key)
        try:
            return self._put(path, key, data, if_match, if_none_match)
        except (FileNotFoundError, NotADirectoryError):  # a concurrent put made our parent a key
            raise StorageError("a prefix of this key is itself a key", backend=self.name, key=key) from None

    def _put(self, path: str, key: str, data: bytes, if_match: str | None, if_none_match: bool) -> str:
        if not data and if_match is None and self._put_empty(path, key, if_none_match):
            return _EMPTY_ETAG
        tmp = self._write_temp(data)
        try:
            if if_none_match:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailed("key exists", backend=self.name, key=key) from None
                except IsADirectoryError:
                    raise PreconditionFailed("key exists (as a prefix)", backend=self.name, key=key) from None
            else:
                with self._locked(key):
                    if if_match is not None:
                        try:
                            current = _etag(self._read(path, key))
                        except NotFound:
                            raise PreconditionFailed("key does not exist", backend=self.name, key=key) from None
                        if current != if_match:
                            raise PreconditionFailed("etag changed", backend=self.name, key=key)
                    try:
                        os.replace(tmp, path)
                    except IsADirectoryError:
                        raise StorageError("a key below this one exists", backend=self.name, key=key) from None
                    tmp = None
        finally:
            if tmp is not None:
                _unlink(tmp)
        if self.fsync:
            _fsync_dir(os.path.dirname(path))
        return _etag(data)

    def _put_empty(self, path: str, key: str, create_only: bool) -> bool:
        """Markers are empty: create them in place, with no temp file (nothing to read
        half-written). Returns False when the general path must handle it."""
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            if create_only:
                raise PreconditionFailed("key exists", backend=self.name, key=key) from None
        except IsADirectoryError:
            return False
        try:  # an existing empty object already has the content asked for
            return os.stat(path).st_size == 0
        except FileNotFoundError:
            return False

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        path = self._path(key)
        with self._locked(key):
            if if_match is not None:
                try:
                    current = _etag(self._read(path, key))
                except NotFound:
                    return
                if current != if_match:
                    raise PreconditionFailed("etag changed", backend=self.name, key=key)
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except IsADirectoryError:
                pass

    async def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            await self.delete(key)

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        validate_prefix(prefix)
        if limit <= 0:
            return []
        head, _, name_start = prefix.rpartition("/")
        base = os.path.join(self.root, *head.split("/")) if head else self.root
        out: list[Entry] = []
        for key, path, st_size, mtime in self._walk(base, head + "/" if head else "", name_start, start_after):
            if st_size == 0:
                etag = _EMPTY_ETAG
            else:
                try:
                    etag = _etag(self._read(path, key))
                except NotFound:
                    continue  # deleted since the scan
            out.append(Entry(key, etag, st_size, mtime))
            if len(out) >= limit:
                break
        return out

    def _walk(self, directory: str, key_prefix: str, name_start: str, start_after: str | None):
        """Yield (key, path, size, mtime) under ``directory`` in lexicographic key order."""
        try:
            with os.scandir(directory) as it:
                entries = []
                for e in it:
                    if not e.name.startswith(name_start):
                        continue
                    if not key_prefix and e.name.startswith(_RESERVED):
                        continue
                    try:
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    entries.append((e.name + "/" if is_dir else e.name, e, is_dir))
        except (FileNotFoundError, NotADirectoryError):
            return
        entries.sort(key=lambda t: t[0])
        for sort_name, e, is_dir in entries:
            key = key_prefix + sort_name
            if is_dir:
                # every key below starts with `key`; skip the subtree if all are <= start_after
                if start_after is not None and key < start_after and not start_after.startswith(key):
                    continue
                yield from self._walk(e.path, key, "", start_after)
            else:
                if start_after is not None and key <= start_after:
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield key, e.path, st.st_size, st.st_mtime

    async def close(self) -> None:
        if self._fds_pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse directory fsync
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
