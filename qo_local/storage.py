"""Filesystem storage with the same atomicity as S3 conditional writes.

- create-only: a fully written temp file is hard-linked into place; ``link`` fails if
  the name exists, atomically, across processes.
- CAS, unconditional put and delete: compare-and-replace under a per-key ``flock``
  (striped lock files), then an atomic ``rename``; readers never see partial data
  because a file is never modified in place.
- etags are the MD5 of the content, as S3 gives for single-part uploads.
- task inputs often hold secrets: files are created 0600 and directories 0700 whatever
  the umask (``mode="private"``); ``mode="group"`` shares the store with the root
  directory's group (files 0660, directories 2770). A temp file is created with its final
  mode, so a secret is never readable by others, not even for a moment.
- the root is refused if it is a symbolic link or owned by another user (whoever
  controls it reads the tasks and can plant some), unless ``allow_foreign_root``.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import functools
import hashlib
import os
import stat
import threading
import zlib
from typing import Any

from qo.errors import ConfigurationError, InvalidInput
from qo.storage import (
    Blob,
    Entry,
    NotFound,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
    check_put,
    validate_key,
    validate_prefix,
)

_RESERVED = ".qo-"  # root-level names of our own (temp files, locks): not keys
_EMPTY_ETAG = '"' + hashlib.md5(b"").hexdigest() + '"'
#: mode name -> (file mode, directory mode); group directories are setgid so that
#: everything below keeps the root's group, whoever's primary group created it
MODES = {"private": (0o600, 0o700), "group": (0o660, 0o2770)}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM, errno.EAGAIN, errno.EIO, errno.EDQUOT}


def _storage_errors(method: Any) -> Any:
    """Turn an OSError escaping ``method`` into StorageUnavailable (transient: out of
    descriptors, space, memory) or StorageError, naming the key."""

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except OSError as exc:
            raise _storage_error(exc, self.name, args[0] if args and isinstance(args[0], str) else None) from None

    return wrapper


def _storage_error(exc: OSError, backend: str, key: str | None) -> StorageError:
    cls = StorageUnavailable if exc.errno in _TRANSIENT else StorageError
    return cls(f"{exc.strerror or exc}", backend=backend, key=key)


class LocalStorage:
    """Storage in a directory tree: one file per key under ``root``."""

    name = "local"

    def __init__(self, root: str, *, fsync: bool | str = False, lock_stripes: int = 64,
                 mode: str = "private", allow_foreign_root: bool | str = False):
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
        if mode not in MODES:
            raise InvalidInput("mode", f"{str(mode)[:40]!r} is not one of: {', '.join(MODES)}")
        self.mode = mode
        self._file_mode, self._dir_mode = MODES[mode]
        # the umask may take group bits off what group mode asks for: then (and only
        # then) each new file and directory is chmod-ed to its mode; private needs none
        umask = _current_umask() if mode == "group" else 0
        self._chmod = umask is None or bool(umask & 0o770)
        self._stripes: dict[int, _Stripe] = {}  # opened lock files, by stripe
        self._stripes_pid = os.getpid()
        self._thread_locks = [threading.Lock() for _ in range(64)]
        self._tmp = os.path.join(self.root, _RESERVED + "tmp")
        self._locks = os.path.join(self.root, _RESERVED + "locks")
        self._allow_foreign = _flag(allow_foreign_root, "allow_foreign_root")
        self._ready = False  # the root is checked (and has its tmp/ and locks/ directories)
        self._ready_lock = threading.Lock()
        self._root_ready(create=False)  # an existing root is checked now; a missing one is made by the first write

    def _root_ready(self, create: bool) -> bool:
        """Check the root once (and, with ``create``, make it): True when it is usable.
        Reads of a store that does not exist find nothing and create nothing."""
        if self._ready:
            return True
        with self._ready_lock:
            if self._ready:
                return True
            if not create and not os.path.lexists(self.root):
                return False
            self._open_root(self._allow_foreign)
            try:
                self._makedirs(self._tmp)
                self._makedirs(self._locks)
            except OSError as exc:
                raise StorageError(f"cannot create {self.root}: {exc.strerror}", backend=self.name) from None
            self._ready = True
            return True

    def _open_root(self, allow_foreign: bool) -> None:
        """Create the root (with the store's mode) or check the one there, before
        anything is written into it: a symlink or a directory of another user is refused."""
        try:
            os.makedirs(os.path.dirname(self.root), exist_ok=True)
            os.mkdir(self.root, self._dir_mode)
            if self._chmod or self._dir_mode & stat.S_ISGID:  # mkdir ignores setgid
                os.chmod(self.root, self._dir_mode)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror}", backend=self.name) from None
        try:
            st = os.lstat(self.root)
            if stat.S_ISLNK(st.st_mode):
                if not allow_foreign:
                    raise ConfigurationError(
                        f"url: the local store root {self.root} is a symbolic link (to {os.readlink(self.root)}); "
                        "whoever can change it decides where task data goes. Use the target path, or allow it "
                        "with allow_foreign_root=1 (file://...?allow_foreign_root=1 or the storage option)")
                st = os.stat(self.root)
        except OSError as exc:
            raise StorageError(f"cannot use {self.root}: {exc.strerror}", backend=self.name) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigurationError(f"url: the local store root {self.root} is not a directory")
        if st.st_uid != os.geteuid() and not allow_foreign:
            raise ConfigurationError(
                f"url: the local store root {self.root} is owned by uid {st.st_uid}, not by this process's "
                f"user (uid {os.geteuid()}); its owner can read every task and plant new ones. Use a directory "
                "of your own, or allow it with allow_foreign_root=1 (file://...?allow_foreign_root=1 or the "
                "storage option)")
        if self.mode == "group":  # below a root without setgid, directories are 0770
            self._dir_mode = 0o770 | (st.st_mode & stat.S_ISGID)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    # -- paths and locks ------------------------------------------------------

    def _path(self, key: str) -> str:
        validate_key(key)
        if key.startswith(_RESERVED):
            raise InvalidInput("key", f"names starting with {_RESERVED!r} are reserved")
        return f"{self.root}/{key}"  # a checked key has no empty, "." or ".." segment (POSIX paths: flock)

    def _locked(self, key: str) -> _Stripe:
        """The exclusive lock of ``key``'s stripe (``with``): a thread lock inside this
        process, then ``flock`` across processes.

        Lock files stay open (creating files is the slow part of a local write); a
        forked child reopens them, since an inherited descriptor shares the parent's lock.
        """
        stripe = zlib.crc32(key.encode()) % self.lock_stripes
        if self._stripes_pid != os.getpid():
            self._stripes, self._stripes_pid = {}, os.getpid()  # never close the parent's descriptors
        return self._stripes.get(stripe) or self._open_stripe(stripe)

    def _open_stripe(self, stripe: int) -> _Stripe:
        thread_lock = self._thread_locks[stripe % len(self._thread_locks)]
        with thread_lock:  # one thread opens it
            found = self._stripes.get(stripe)
            if found is None:
                fd = os.open(os.path.join(self._locks, f"{stripe:04d}"), os.O_RDWR | os.O_CREAT, self._file_mode)
                if self._chmod:
                    os.fchmod(fd, self._file_mode)
                found = self._stripes[stripe] = _Stripe(thread_lock, fd)
        return found

    def _write_temp(self, data: bytes) -> str:
        tmp = os.path.join(self._tmp, os.urandom(16).hex())  # a fresh name (as a uuid4's hex, without the object)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._file_mode)  # never wider
        try:
            if self._chmod:  # group mode under a umask that takes group bits: widen, before any data
                os.fchmod(fd, self._file_mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _read(self, path: str, key: str) -> bytes:
        try:  # O_NONBLOCK: a FIFO planted at a key reads as empty instead of waiting for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound("no such key", backend=self.name, key=key) from None
        try:  # objects are small: one read is usually all of it (a short read is the end)
            chunk = os.read(fd, 65536)
            if len(chunk) < 65536:
                return chunk
            chunks = [chunk]
            while chunk:
                chunk = os.read(fd, 1 << 20)
                chunks.append(chunk)
            return b"".join(chunks)
        except IsADirectoryError:
            raise NotFound("no such key", backend=self.name, key=key) from None
        finally:
            os.close(fd)

    def _parent(self, path: str, key: str) -> None:
        try:
            self._makedirs(os.path.dirname(path))
        except (FileExistsError, NotADirectoryError):
            raise StorageError("a prefix of this key is itself a key", backend=self.name, key=key) from None

    def _makedirs(self, directory: str) -> None:
        """``os.makedirs(exist_ok=True)`` with the store's directory mode, in one
        ``mkdir`` when the directory exists; FileExistsError if a file is in the way."""
        if directory == self.root or os.path.isdir(directory):  # the common case: one stat, no exception
            return
        try:
            os.mkdir(directory, self._dir_mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            return
        except FileNotFoundError:  # make the parent, then this one (once more, above)
            self._makedirs(os.path.dirname(directory))
            self._makedirs(directory)
            return
        if self._chmod:
            os.chmod(directory, self._dir_mode)

    def _clear_empty_dir(self, path: str, key: str) -> None:
        """Remove the empty directories that deleted keys below ``key`` left at ``path``
        (they would make ``key`` look taken); StorageError if keys below it remain."""
        if not _is_dir(path):
            return
        try:
            _remove_empty_tree(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise StorageError("a key below this one exists", backend=self.name, key=key) from None

    # -- the contract -------------------------------------------------------------
    # (each call maps an OSError it does not handle itself to a StorageError: out of
    # descriptors, space or memory is transient for the engine, anything else names
    # the key; a raw OSError must never reach a loop that serves other work)

    @_storage_errors
    async def get(self, key: str) -> Blob:
        path = self._path(key)
        if not self._root_ready(create=False):
            raise NotFound("no such key (the store does not exist yet)", backend=self.name, key=key)
        data = self._read(path, key)
        return Blob(data, _etag(data))

    @_storage_errors
    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        path = self._path(key)
        data = check_put(data, if_match, if_none_match)
        self._root_ready(create=True)
        # the common case costs no look first: the key's directory is there and no
        # directory is at the key. Otherwise make way (the directory, or clear an empty
        # one that deleted keys below the key left there) and try once more
        for last in (False, True):
            try:
                return self._put(path, key, data, if_match, if_none_match)
            except (FileNotFoundError, NotADirectoryError):  # no directory for the key (yet)
                if last:  # a concurrent put made our parent a key
                    raise StorageError("a prefix of this key is itself a key", backend=self.name, key=key) from None
                self._parent(path, key)
            except _DirectoryAtKey:
                if last:
                    raise StorageError("a key below this one exists", backend=self.name, key=key) from None
                self._clear_empty_dir(path, key)
        raise AssertionError("unreachable")  # pragma: no cover

    def _put(self, path: str, key: str, data: bytes, if_match: str | None, if_none_match: bool) -> str:
        """One attempt. FileNotFoundError or NotADirectoryError: the key's directory is
        missing (or a key is in its way); ``_DirectoryAtKey``: a directory is at the key.
        A CAS on a directory or a missing key is PreconditionFailed: the key is not there."""
        if not data and if_match is None and self._put_empty(path, key, if_none_match):
            return _EMPTY_ETAG
        tmp = self._write_temp(data)
        try:
            if if_none_match:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    if _is_dir(path):
                        raise _DirectoryAtKey from None
                    raise PreconditionFailed("key exists", backend=self.name, key=key) from None
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
                        raise _DirectoryAtKey from None
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
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._file_mode)
            try:
                if self._chmod:
                    os.fchmod(fd, self._file_mode)
            finally:
                os.close(fd)
            return True
        except FileExistsError:
            if _is_dir(path):
                raise _DirectoryAtKey from None
            if create_only:
                raise PreconditionFailed("key exists", backend=self.name, key=key) from None
        try:  # an existing empty object already has the content asked for
            return os.stat(path).st_size == 0
        except FileNotFoundError:
            return False

    @_storage_errors
    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        self._delete(key, if_match)

    async def delete_many(self, keys: list[str]) -> None:
        for key in keys:  # (not through self.delete: a meter installed there would count each)
            try:
                self._delete(key, None)
            except OSError as exc:
                raise _storage_error(exc, self.name, key) from None

    def _delete(self, key: str, if_match: str | None) -> None:
        path = self._path(key)
        if not self._root_ready(create=False):
            return  # nothing to delete in a store that does not exist
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
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                pass

    @_storage_errors
    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[Entry]:
        validate_prefix(prefix)
        if limit <= 0 or not self._root_ready(create=False):
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
        """Yield (key, path, size, mtime) under ``directory`` in lexicographic key order.

        The names are listed and sorted in C (``listdir``); only the entries yielded or
        descended into are ``lstat``-ed, so a LIST of the first few of a directory of
        thousands (a busy ready index) costs little more than the listing. A directory
        ``d`` holds keys ``d/...``: it sorts as ``d/``, after names that continue ``d``
        with a character below ``/`` (``d-x``), and is moved there when found.
        """
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        if name_start:
            names = [n for n in names if n.startswith(name_start)]
        if not key_prefix:
            names = [n for n in names if not n.startswith(_RESERVED)]
        names.sort()
        i = 0
        local = start_after[len(key_prefix):] if start_after is not None and start_after.startswith(key_prefix) \
            else None
        if local:  # skip what sorts at or before start_after, but not a directory its keys may continue
            i = bisect.bisect_right(names, local)
            for k in range(1, len(local) + 1):  # the shortest such name sorts first
                at = bisect.bisect_left(names, local[:k], 0, i)
                if at < i and names[at] == local[:k]:
                    i = at
                    break
        while i < len(names):
            name = names[i]
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # deleted since the listing
                i += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                j, n = i + 1, len(name)
                while j < len(names) and names[j].startswith(name) and names[j][n] < "/":
                    j += 1
                if j > i + 1:  # those names sort before this directory's keys
                    names[i:j] = [*names[i + 1 : j], name]
                    continue
                key = key_prefix + name + "/"
                # every key below starts with `key`; skip the subtree if all are <= start_after
                if start_after is None or key > start_after or start_after.startswith(key):
                    yield from self._walk(path, key, "", start_after)
            else:
                key = key_prefix + name
                if start_after is None or key > start_after:
                    yield key, path, st.st_size, st.st_mtime
            i += 1

    async def close(self) -> None:
        if self._stripes_pid == os.getpid():
            for stripe in self._stripes.values():
                os.close(stripe.fd)
        self._stripes = {}


class _Stripe:
    """A held lock stripe (``with``): its thread lock, then its lock file's ``flock``."""

    __slots__ = ("thread_lock", "fd")

    def __init__(self, thread_lock: threading.Lock, fd: int):
        self.thread_lock, self.fd = thread_lock, fd

    def __enter__(self) -> None:
        self.thread_lock.acquire()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.thread_lock.release()
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.thread_lock.release()


class _DirectoryAtKey(Exception):
    """A directory is where a key's file would go (left by keys below it, or holding some)."""


def _is_dir(path: str) -> bool:
    """A directory itself at ``path`` (a symbolic link to one is an object, as a file is)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove_empty_tree(path: str) -> None:
    """rmdir ``path`` and the directories below it, deepest first; OSError (ENOTEMPTY)
    at the first that holds anything else (a file: a key, however it got there)."""
    for name in os.listdir(path):
        below = os.path.join(path, name)
        if _is_dir(below):
            _remove_empty_tree(below)
    os.rmdir(path)


def _flag(value: bool | str, field: str) -> bool:
    """A yes/no option given as a bool or as a URL query string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidInput(field, f"{str(value)[:40]!r} is not one of 1, 0, true, false, yes, no")


def _current_umask() -> int | None:
    """The process umask, read without changing it (Linux ``/proc``); None if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


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
