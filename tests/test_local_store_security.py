"""The local store keeps task data to its owner (issue 15): owner-only modes whatever the
umask, a documented group mode, and no root that someone else controls."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

import qo
from qo.backends import open_storage
from qo_local.storage import LocalStorage


@pytest.fixture
def umask():
    """Set the process umask for the test (``umask(0)``: the most permissive); restored after."""
    old = os.umask(0o022)

    def set_(value: int) -> None:
        os.umask(value)

    yield set_
    os.umask(old)


def modes(root) -> dict[str, int]:
    """Permission bits (setgid included) of the root and everything below it, by relative path."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


async def fill(storage: LocalStorage) -> None:
    """Every kind of write: create-only, plain put, CAS, an empty marker, nested keys."""
    etag = await storage.put("q/tasks/t1.json", b'{"password": "hunter2"}', if_none_match=True)
    await storage.put("q/tasks/t1.json", b'{"password": "hunter3"}', if_match=etag)
    await storage.put("q/ready/128/0001-t1", b"", if_none_match=True)
    await storage.put("q/settings.json", b"{}")
    await storage.delete("q/settings.json")
    await storage.put("top", b"x")


def is_dir(root, rel: str) -> bool:
    return os.path.isdir(os.path.join(root, rel))


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
async def test_private_store_is_owner_only_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    root = tmp_path / "store"
    storage = open_storage(str(root))
    await fill(storage)
    await storage.close()
    found = modes(root)
    assert {"q/tasks/t1.json", "q/ready/128/0001-t1", "top", ".qo-tmp", ".qo-locks"} <= set(found)
    assert any(rel.startswith(".qo-locks/") for rel in found)  # a lock file was made
    for rel, mode in found.items():
        assert mode == (0o700 if is_dir(root, rel) else 0o600), f"{rel}: {oct(mode)}"


async def test_a_rewrite_replaces_a_world_readable_file_of_an_older_version(tmp_path, umask):
    umask(0)
    storage = open_storage(str(tmp_path / "store"))
    await storage.put("seed.json", b"{}")  # the store is made by its first write
    old = tmp_path / "store" / "old.json"
    old.write_bytes(b"{}")
    old.chmod(0o644)
    etag = (await storage.get("old.json")).etag
    await storage.put("old.json", b'{"secret": 1}', if_match=etag)
    await storage.close()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode, mask, file_mode", [("private", 0, 0o600), ("group", 0, 0o660), ("group", 0o077, 0o660)],
                         ids=["private", "group-umask000", "group-umask077"])
async def test_temp_files_are_born_with_their_mode(tmp_path, umask, monkeypatch, mode, mask, file_mode):
    """No window where a secret is readable by others: the temp file that becomes the
    object is created with (at most) its final mode, and gets its data only after any
    widening to the group; private mode makes no chmod call at all."""
    umask(mask)
    storage = open_storage(f"file://{tmp_path / 'store'}?mode={mode}")
    tmp_dir = os.path.join(storage.root, ".qo-tmp")
    real_open, real_write, real_fchmod = os.open, os.write, os.fchmod
    events: list[tuple[str, int]] = []
    fds: set[int] = set()

    def spy_open(path, flags, mode=0o777, **kw):
        fd = real_open(path, flags, mode, **kw)
        if str(path).startswith(tmp_dir) and flags & os.O_CREAT:
            fds.add(fd)
            events.append(("open", stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    def spy_write(fd, data):
        if fd in fds:
            events.append(("write", stat.S_IMODE(os.fstat(fd).st_mode)))
        return real_write(fd, data)

    def spy_fchmod(fd, mode):
        events.append(("fchmod", mode))
        return real_fchmod(fd, mode)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "write", spy_write)
    monkeypatch.setattr(os, "fchmod", spy_fchmod)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: events.append(("chmod", 0)))
    await storage.put("k", b"secret input", if_none_match=True)
    monkeypatch.undo()
    await storage.close()
    opens = [m for kind, m in events if kind == "open"]
    writes = [m for kind, m in events if kind == "write"]
    assert opens and writes
    assert all(m & ~file_mode == 0 for m in opens)  # never wider than the final mode
    assert all(m == file_mode for m in writes)  # the data goes into a file of the final mode
    if mode == "private":
        assert not any(kind in ("fchmod", "chmod") for kind, _ in events)  # no extra syscall
    assert stat.S_IMODE(os.stat(os.path.join(storage.root, "k")).st_mode) == file_mode


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
async def test_group_mode_shares_with_the_group_and_keeps_it(tmp_path, umask, mask):
    umask(mask)
    root = tmp_path / "store"
    storage = open_storage(f"file://{root}?mode=group")
    assert storage.mode == "group"
    await fill(storage)
    await storage.close()
    for rel, mode in modes(root).items():
        assert mode == (0o2770 if is_dir(root, rel) else 0o660), f"{rel}: {oct(mode)}"


async def test_group_mode_under_an_existing_root_without_setgid(tmp_path, umask):
    umask(0o022)
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o770)
    storage = LocalStorage(str(root), mode="group")
    await fill(storage)
    await storage.close()
    for rel, mode in modes(root).items():
        assert mode == (0o770 if is_dir(root, rel) else 0o660), f"{rel}: {oct(mode)}"


async def test_a_symlinked_root_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "store"
    link.symlink_to(target)
    with pytest.raises(qo.ConfigurationError) as err:
        open_storage(str(link))
    message = str(err.value)
    assert str(link) in message and "symbolic link" in message and "allow_foreign_root=1" in message
    assert os.listdir(target) == []

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(qo.ConfigurationError, match="symbolic link"):
        open_storage(f"file://{dangling}")
    assert not (tmp_path / "nowhere").exists()

    storage = open_storage(f"file://{link}?allow_foreign_root=1")
    await storage.put("k", b"v")
    await storage.close()
    assert (target / "k").read_bytes() == b"v"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
async def test_a_root_owned_by_another_user_is_refused_even_for_root(tmp_path):
    root = tmp_path / "theirs"
    root.mkdir()
    os.chown(root, 65534, 65534)
    with pytest.raises(qo.ConfigurationError) as err:
        open_storage(str(root))
    message = str(err.value)
    assert str(root) in message and "uid 65534" in message and "allow_foreign_root=1" in message
    assert os.listdir(root) == []  # checked before anything is written

    storage = open_storage(str(root), options={"allow_foreign_root": True})
    await storage.put("k", b"v")
    await storage.close()
    assert (root / "k").read_bytes() == b"v"
    storage = open_storage(f"file://{root}?allow_foreign_root=yes")
    assert (await storage.get("k")).data == b"v"
    await storage.close()


def test_a_root_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"")
    with pytest.raises(qo.ConfigurationError, match="is not a directory"):
        open_storage(str(path))


@pytest.mark.parametrize(
    "url, options, field, text",
    [
        ("file://{root}?mode=world", {}, "mode", "'world' is not one of: private, group"),
        ("{root}", {"mode": "0777"}, "mode", "'0777' is not one of"),
        ("file://{root}?allow_foreign_root=maybe", {}, "allow_foreign_root", "'maybe' is not one of"),
        ("file://{root}?lock_stripes=lots", {}, "lock_stripes", "'lots' is not an integer"),
        ("file://{root}?mdoe=group", {}, "url", "unknown query parameter 'mdoe'"),
        ("file://{root}?mode", {}, "url", "malformed query string"),
        ("{root}", {"allow_foreign": True}, "options", "unknown local storage options: allow_foreign"),
    ],
)
def test_bad_settings_name_the_field_and_write_nothing(tmp_path, url, options, field, text):
    root = tmp_path / "store"
    with pytest.raises(qo.InvalidInput) as err:
        open_storage(url.format(root=root), options=options)
    assert err.value.field == field and text in str(err.value)
    assert not root.exists()


async def test_storage_options_win_over_the_url_query(tmp_path, umask):
    umask(0)
    storage = open_storage(f"file://{tmp_path / 'store'}?mode=group", options={"mode": "private"})
    await storage.put("k", b"v")
    await storage.close()
    assert storage.mode == "private"
    assert stat.S_IMODE(os.stat(tmp_path / "store" / "k").st_mode) == 0o600


def test_a_bare_path_keeps_its_question_mark(tmp_path):
    storage = open_storage(str(tmp_path / "odd?mode=group"))
    assert storage.root.endswith("odd?mode=group") and storage.mode == "private"


async def test_running_out_of_descriptors_is_a_transient_storage_error_not_a_raw_oserror(tmp_path, monkeypatch):
    """Found by the soak: at 1024 open files every write raised a raw OSError (EMFILE),
    which no loop handled. It is StorageUnavailable now (retried, backed off); and a store
    keeps at most 64 lock files open by default (it kept up to 1024)."""
    import errno as errno_mod

    import qo
    from qo_local.storage import LocalStorage

    store = LocalStorage(str(tmp_path / "s"))
    assert store.lock_stripes == 64
    real_open = os.open

    def no_descriptors(path, flags, mode=0o777, **kw):
        raise OSError(errno_mod.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", no_descriptors)
    with pytest.raises(qo.StorageUnavailable, match="Too many open files"):
        await store.put("q/tasks/x.json", b"{}")
    monkeypatch.setattr(os, "open", real_open)
    await store.put("q/tasks/x.json", b"{}")
    assert (await store.get("q/tasks/x.json")).data == b"{}"


def test_a_fifo_planted_at_a_key_reads_as_an_object_without_blocking(tmp_path):
    """Whatever sits in the store is read without waiting on it: a FIFO at a key is an
    empty object (a task there is then a corrupt object, reported as such), and a LIST
    over it answers; neither blocks the worker's loop waiting for a writer."""
    import threading

    root = tmp_path / "s"
    asyncio.run(LocalStorage(str(root)).put("q/tasks/a.json", b"{}"))
    os.mkfifo(root / "q" / "tasks" / "b.json", 0o600)
    results: list = []

    def read() -> None:
        async def both():
            st = LocalStorage(str(root))
            blob = await st.get("q/tasks/b.json")
            listed = await st.list("q/tasks/")
            await st.close()
            return blob.data, [(e.key, e.size) for e in listed]
        results.append(asyncio.run(both()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert results == [(b"", [("q/tasks/a.json", 2), ("q/tasks/b.json", 0)])]
