"""The engine's fast paths give what the plain code they replace gives (no timing here:
benchmarks/bench.py judges speed)."""

from __future__ import annotations

import copy
import json

import attrs
import pytest

from qo import keys
from qo.model import Task, dumps, record_json
from qo.packs import Pack, clone, copy_json


def _pack() -> Pack:
    pid = keys.new_pack_id(3)
    tasks = [Task(id=keys.entry_id(pid, i), task_type="t", input={"i": i, "deep": [{"x": [1, 2.5, None]}]},
                  created_at=1.0, available_at=1.0, updated_at=1.0) for i in range(3)]
    pack = Pack.build(pid, tasks, 1.0)
    pack.lease = {"worker_id": "w", "lease_id": "l", "claimed_at": 2.0}
    pack.extra = {"future": {"nested": [1, {"a": True}]}}
    return pack


def test_clone_is_a_deep_copy_equal_to_deepcopy():
    pack = _pack()
    new = clone(pack)
    assert new == copy.deepcopy(pack) == pack
    assert new.to_json() == pack.to_json()
    # nothing mutable is shared: changing the copy anywhere leaves the original as it was
    before = pack.to_json()
    new.entries[0]["input"]["deep"][0]["x"].append(3)
    new.template["status"] = "running"
    new.lease["lease_id"] = "other"
    new.extra["future"]["nested"][1]["a"] = False
    new.entries.append({})
    assert pack.to_json() == before


def test_copy_json_falls_back_to_deepcopy_for_other_types():
    class Box:
        def __init__(self, v):
            self.v = v

    value = {"a": [Box([1])], "t": (1, [2])}
    out = copy_json(value)
    assert out["a"][0] is not value["a"][0] and out["a"][0].v == [1] and out["a"][0].v is not value["a"][0].v
    assert out["t"] == (1, [2]) and out["t"][1] is not value["t"][1]


def test_to_dict_and_from_dict_match_attrs():
    task = Task(id="0" * 24, task_type="t", input={"x": 1}, extra={"newer": 1})
    d = task.to_dict()
    assert d == {**task.extra, **{k: v for k, v in attrs.asdict(task, recurse=False).items() if k != "extra"}}
    assert list(d)[0] == "newer"  # extra first, then the fields in their order, as before
    assert Task.from_dict(d) == task
    plain = Task(id="0" * 24, task_type="t")
    assert list(plain.to_dict()) == [f.name for f in attrs.fields(Task) if f.name != "extra"]
    again = Task.from_dict(plain.to_dict())
    assert again == plain and again.extra == {}
    pack = _pack()
    assert Pack.from_dict(pack.to_dict()) == pack and pack.to_dict()["future"] == {"nested": [1, {"a": True}]}


def test_dumps_is_canonical_json():
    value = {"b": [1.5, None, "é"], "a": {"z": 1, "y": True}}
    assert dumps(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False,
                                      ensure_ascii=False).encode()
    for bad in (float("nan"), float("inf")):
        try:
            dumps({"x": bad})
        except ValueError:
            pass
        else:
            raise AssertionError("NaN/Infinity must be refused")


def test_field_checks_answer_as_the_plain_checks():
    import enum
    import math

    from qo import stored

    class Level(enum.IntEnum):
        LOW = 1

    class Sub(float):
        pass

    values = [None, True, False, 0, 1, -5, 2.5, float("nan"), float("inf"), -float("inf"), Level.LOW, Sub(1.5),
              Sub("inf"), "x", "", b"x", [], ["a"], {}, {"a": 1}, (), 10 ** 20]

    def plain_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    plain = {stored.is_number: plain_number, stored.is_str: lambda v: isinstance(v, str),
             stored.is_dict: lambda v: isinstance(v, dict)}
    for check, reference in plain.items():
        opt = stored.optional(check)
        for v in values:
            assert check(v) == reference(v), (check, v)
            assert opt(v) == (v is None or reference(v)), (check, v)
    listed = stored.is_list_of(stored.is_str)
    assert listed([]) and listed(["a"]) and not listed([1]) and not listed(()) and not listed(None)
    odd = stored.optional(lambda v: v == 3)  # any other check keeps the generic wrapper
    assert odd(None) and odd(3) and not odd(4)


def test_fork_shares_entries_but_replacing_one_leaves_the_original_as_it_was():
    from qo.packs import fork

    pack = _pack()
    before = pack.to_json()
    new = fork(pack)
    task = new.task(1)
    task.status, task.attempt = "running", 1
    new.put(1, task)
    new.move_out(2, new.task(2))
    new.status, new.lease = "running", {"worker_id": "x", "lease_id": "y", "claimed_at": 3.0}
    new.settle_status(5.0)
    assert pack.to_json() == before
    assert new.status_of(1) == "running" and new.status_of(2) == "moved" and pack.status_of(1) == "pending"


async def test_a_pack_remembered_after_a_read_or_a_write_is_what_storage_holds(tmp_path):
    """The PackStore remembers the bytes it read or wrote: a caller that changes its pack
    in place afterwards cannot make a later CAS write anything but the stored version."""
    import qo

    q = await qo.connect(str(tmp_path), queue="fp")
    try:
        tasks = await q.submit_many([("t", {"i": i}) for i in range(4)])
        packs = q.store.packs
        pack_id = keys.pack_of(tasks[0].id)[0]
        pack, etag = await packs.load(pack_id)
        pack.entries[2]["input"]["i"] = 99  # the caller's copy, changed in place
        pack.template["max_retries"] = 7
        recalled_etag, recalled = packs._recall(pack_id)
        assert recalled_etag == etag and recalled.entries[2]["input"] == {"i": 2}
        assert recalled.template["max_retries"] == 3
        recalled.entries[3]["input"]["i"] = 55  # a recalled copy is the caller's own too
        assert packs._recall(pack_id)[1].entries[3]["input"] == {"i": 3}
        # a change of one task through the remembered version writes the others as stored
        await q.cancel(tasks[1].id)
        stored, _ = await packs.load(pack_id)
        assert [stored.task(i).input for i in range(4)] == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]
        assert stored.task(1).status == "cancelled" and stored.template["max_retries"] == 3
        # and after a write: the bytes written, not the object the writer keeps changing
        stored.template["timeout_seconds"] = 1.0
        etag2 = await packs.replace(stored, (await packs.load(pack_id))[1])
        stored.template["timeout_seconds"] = 2.0
        assert packs._recall(pack_id)[0] == etag2
        assert packs._recall(pack_id)[1].template["timeout_seconds"] == 1.0
    finally:
        await q.close()


def test_a_task_built_with_the_template_checked_once_is_the_task_built_in_full():
    import pytest

    from qo.errors import CorruptObject

    pack = _pack()
    assert pack.check_template()
    for i in range(3):
        assert pack.task(i, template_checked=True) == pack.task(i)
    # a bad field of the entry: the same error as the full check names
    pack.entries[1] = {**pack.entries[1], "attempt": -1, "priority": "high"}
    with pytest.raises(CorruptObject) as full:
        pack.task(1, "k")
    with pytest.raises(CorruptObject) as checked:
        pack.task(1, "k", template_checked=True)
    assert str(checked.value) == str(full.value) and "priority" in str(full.value)
    # a bad shared field: check_template says so, and the full check is used
    bad = _pack()
    bad.template = {**bad.template, "timeout_seconds": -5}
    assert not bad.check_template()
    with pytest.raises(CorruptObject):
        bad.task(0)
    # a template without a required field that the entry gives is fine, one no one gives is not
    partial = _pack()
    partial.template = {k: v for k, v in partial.template.items() if k != "status"}
    partial.entries[0] = {**partial.entries[0], "status": "pending"}
    assert partial.task(0, template_checked=True) == partial.task(0)
    with pytest.raises(CorruptObject):
        partial.task(1, template_checked=True)


async def test_a_held_pack_keeps_what_another_writer_changes_in_its_entries(tmp_path):
    """The slot runs the claim's task and the flush reuses its flags only while the held
    pack has the same entry: a dependent submitted on a running task and on one not yet
    started (each a CAS of the pack by another writer) is released once its parent ends."""
    import asyncio

    import qo
    from qo.worker import Worker

    q = await qo.connect(str(tmp_path), queue="fp")
    try:
        tasks = await q.submit_many([("job", i) for i in range(3)])
        worker = Worker(q, concurrency=1, aging=False, poll_min=0.01, poll_max=0.05, sweep_interval=0.2,
                        buffer_max_age=0.5)
        children: list[str] = []
        ran: list[object] = []

        @worker.handler("job")
        async def job(x: int) -> int:
            if x == 0:  # running now: one dependent on itself, one on a sibling not started
                children.append((await q.submit("child", "of-0", depends_on=[tasks[0].id])).id)
                children.append((await q.submit("child", "of-2", depends_on=[tasks[2].id])).id)
            if x == 1:  # meanwhile a timed flush is refused and re-reads the pack: task 2's
                await asyncio.sleep(1.0)  # entry now says it has a dependent
            return x

        @worker.handler("child")
        async def child(x: str) -> None:
            ran.append(x)

        await asyncio.wait_for(worker.run(until_idle=True), 60)
        assert sorted(ran) == ["of-0", "of-2"]
        for t in tasks:
            got = await q.get(t.id)
            assert got.status == "completed" and got.attempt == 1
        assert (await q.get(tasks[0].id)).has_dependents and (await q.get(tasks[2].id)).has_dependents
        assert [(await q.get(c)).status for c in children] == ["completed", "completed"]
    finally:
        await q.close()


def _too_deep_by_scanning(text: str, limit: int) -> bool:
    """The character scanner too_deep replaced: the reference it must agree with."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def test_too_deep_agrees_with_a_character_scanner():
    import random

    from qo import stored

    rng = random.Random(5)
    alphabet = '[]{}"\\ab,:\n'
    for _ in range(30000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        for limit in (0, 1, 2, 4):
            assert stored.too_deep(text, limit) == _too_deep_by_scanning(text, limit), (text, limit)
    for depth in (199, 200, 201, 300):
        nested = "[" * depth + "]" * depth
        assert stored.too_deep(nested) == (depth > 200) == _too_deep_by_scanning(nested, 200)
        quoted = json.dumps({"s": "[{" * depth + '\\"]', "v": [[1]] * 150})
        assert stored.too_deep(quoted) is False is _too_deep_by_scanning(quoted, 200)
    assert stored.too_deep('"' + "[" * 300) is False  # an unterminated string holds the rest
    assert stored.too_deep("[" * 201 + '"') is True


def test_a_held_pack_encodes_only_the_entries_it_replaced_and_writes_the_same_bytes(monkeypatch):
    import qo.packs as packs

    pack = _pack()
    pack.extra = {"aaa": {"entries": []}, "zzz": '"entries":[]'}  # the entries' own text, elsewhere
    fragments: dict = {}
    assert pack.to_json(fragments) == record_json(pack.to_dict())
    assert len(fragments) == 3
    encoded: list = []
    real = packs.record_json
    monkeypatch.setattr(packs, "record_json", lambda obj: (encoded.append(obj), real(obj))[1])
    new = packs.fork(pack)
    task = new.task(1)
    task.status, task.attempt, task.output = "completed", 1, {"ok": [1, 2.5e-07]}
    new.put(1, task)
    data = new.to_json(fragments)
    assert data == real(new.to_dict()) and json.loads(data)["entries"][1]["status"] == "completed"
    assert [obj for obj in encoded if obj is not None and "template" not in obj] == [new.entries[1]]  # one entry
    assert set(fragments) == {id(e) for e in new.entries}  # the replaced entry's old encoding is gone
    assert pack.to_json() == real(pack.to_dict())  # the original, as it was
    assert Pack.from_json(data).to_dict() == json.loads(dumps(new.to_dict()))  # what json would have stored


def _plain_put(pack: Pack, index: int, task: Task) -> None:
    """``Pack.put`` as first written: the task's dict, less what the template holds."""
    d = task.to_dict()
    del d["id"]
    d.pop("schema", None)
    rev = d.pop("rev")
    entry = {k: v for k, v in d.items() if pack.template.get(k, attrs.NOTHING) != v}
    entry["rev"] = rev
    pack.entries[index] = entry


def test_put_stores_the_entry_the_plain_code_stores_in_the_same_order():
    pack = _pack()
    pack.template["newer_shared"] = 5  # a field of a newer release in the template
    variants = []
    for i in range(3):
        task = pack.task(i)
        variants.append(task)
        changed = attrs.evolve(task, status="running", attempt=1, started_at=2.5, worker_id="w",
                               priority=task.priority + 1, input=None, extra={"newer_shared": 5, "own": [1]})
        variants.append(changed)
        variants.append(attrs.evolve(task, created_at=True, extra={"newer_shared": 6}))  # True == 1.0 is kept as before
    plain = copy.deepcopy(pack)
    for n, task in enumerate(variants):
        pack.put(n % 3, task)
        _plain_put(plain, n % 3, task)
        assert list(pack.entries[n % 3].items()) == list(plain.entries[n % 3].items())
        assert json.dumps(pack.entries[n % 3]) == json.dumps(plain.entries[n % 3])
    pack.template = {**pack.template, "priority": 9}  # a new template object: looked up afresh
    plain.template = dict(pack.template)
    pack.put(0, variants[1])
    _plain_put(plain, 0, variants[1])
    assert list(pack.entries[0].items()) == list(plain.entries[0].items())


def _plain_listing(root: str, prefix: str, start_after: str | None) -> list[str]:
    """Every key under ``root`` (files, found by walking it), sorted, filtered as LIST does."""
    import os

    found = []
    for directory, _dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        for f in files:
            key = f if rel == "." else f"{rel}/{f}"
            if not key.startswith(".qo-"):
                found.append(key)
    return sorted(k for k in found if k.startswith(prefix) and (start_after is None or k > start_after))


async def test_local_listing_matches_a_plain_sorted_walk(tmp_path):
    """The local LIST (listdir, sort, lstat only what it yields) gives keys in plain string
    order, including a directory ``d`` beside names that continue ``d`` below ``/``
    (``d-x`` sorts before ``d/...``), from any ``start_after``, for any prefix."""
    import random

    from qo.errors import InvalidInput
    from qo.storage import StorageError
    from qo_local.storage import LocalStorage

    rng = random.Random(11)
    root = str(tmp_path / "s")
    st = LocalStorage(root)
    alphabet = ["a", "b", "-", ".", "0", "z"]
    written = set()
    for _ in range(160):
        key = "/".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
                       for _ in range(rng.randint(1, 3)))
        try:
            await st.put(key, b"" if rng.random() < 0.5 else b"x")
            written.add(key)
        except (StorageError, InvalidInput):  # a prefix of it is a key (or it of one); a "." segment
            pass
    candidates = sorted(written) + ["", "a", "a-", "a/", "b-", "z", "0/", "a-/b"]
    for _ in range(300):
        prefix = rng.choice(["", "a", "a-", "a/", "b", "-", ".a", "0a/"])
        start_after = rng.choice([None, *candidates]) if rng.random() < 0.8 else None
        limit = rng.choice([1, 2, 5, 1000])
        got = [e.key for e in await st.list(prefix, start_after=start_after, limit=limit)]
        assert got == _plain_listing(root, prefix, start_after)[:limit], (prefix, start_after, limit)
    await st.close()


_PUT_KINDS = [("create-only", {"if_none_match": True}), ("unconditional", {})]


@pytest.mark.parametrize("data", [b"x", b""], ids=["object", "marker"])
@pytest.mark.parametrize("kind,kwargs", _PUT_KINDS, ids=[k for k, _ in _PUT_KINDS])
async def test_local_writes_try_first_and_make_way_only_when_needed(tmp_path, kind, kwargs, data):
    """A local write no longer looks before it writes (is the key's directory there, is a
    directory at the key?): it tries, and makes way only when that fails. Every case the
    look handled ends as it did: a new deep prefix is made; an empty directory left by
    deleted keys below is cleared; a directory holding keys, or a key where a directory
    must go, is a StorageError that changes nothing; a symbolic link at the key is a key."""
    import os

    from qo.storage import Blob, PreconditionFailed, StorageError
    from qo_local.storage import LocalStorage

    st = LocalStorage(str(tmp_path / "s"))
    etag = await st.put("new/deep/prefix/k", data, **kwargs)
    assert await st.get("new/deep/prefix/k") == Blob(data, etag)

    os.makedirs(tmp_path / "s" / "empty" / "below" / "below")  # what deleted keys leave
    etag = await st.put("empty", data, **kwargs)
    assert await st.get("empty") == Blob(data, etag)

    await st.put("full/child", b"kept")
    with pytest.raises(StorageError, match="a key below this one exists"):
        await st.put("full", data, **kwargs)
    assert await st.get("full/child") == Blob(b"kept", await st.put("full/child", b"kept"))

    await st.put("file", b"a key")
    with pytest.raises(StorageError, match="a prefix of this key is itself a key"):
        await st.put("file/child", data, **kwargs)
    assert (await st.get("file")).data == b"a key"

    os.symlink(tmp_path / "s" / "new", tmp_path / "s" / "link")  # a link to a directory is not one
    if kwargs:
        with pytest.raises(PreconditionFailed):
            await st.put("link", data, **kwargs)
        assert os.path.islink(tmp_path / "s" / "link")
    else:  # replaced by the object, as any key is
        etag = await st.put("link", data, **kwargs)
        assert await st.get("link") == Blob(data, etag) and not os.path.islink(tmp_path / "s" / "link")
    assert sorted(os.listdir(tmp_path / "s" / ".qo-tmp")) == []  # no temp file left by a failed try
    await st.close()


def test_a_record_read_with_every_field_is_built_by_position_as_by_keyword():
    """StoredRecord.from_dict passes a complete record's fields by position (matching 30
    keywords costs more than the rest of the read): each field lands where its keyword
    would put it, for every record class, and a record missing a field or holding a
    newer release's still goes by keyword."""
    from qo.model import record_fields

    for cls in (Task, Pack):
        names = [n for n in record_fields(cls)[0] if n != "extra"]
        distinct = {name: f"value-{i}" for i, name in enumerate(names)}  # a value no other field has
        got = cls.from_dict(dict(distinct))
        assert got == cls(**distinct, extra={})
        assert all(getattr(got, name) == value for name, value in distinct.items())
        missing = {k: v for k, v in distinct.items() if k != names[-1]}  # a field with a default
        assert cls.from_dict(dict(missing)) == cls(**missing, extra={})
        newer = {**distinct, "zz_newer": 1}
        assert cls.from_dict(newer).extra == {"zz_newer": 1}



def test_a_forked_child_locks_on_lock_files_of_its_own(tmp_path):
    """Lock files stay open between writes; a forked child must open its own, since an
    inherited descriptor shares the parent's flock (both would hold it at once)."""
    import asyncio
    import fcntl
    import os

    from qo_local.storage import LocalStorage

    st = LocalStorage(str(tmp_path / "s"))
    asyncio.run(st.put("k", b"1"))  # the parent opens k's stripe
    parents = st._locked("k")
    held, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold k's lock until told
        try:
            with st._locked("k"):
                os.write(held[1], b"x")
                os.read(release[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(held[0], 1) == b"x"
        with pytest.raises(BlockingIOError):  # the child's lock is a lock against us
            fcntl.flock(parents.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.write(release[1], b"x")
        os.waitpid(pid, 0)
    fcntl.flock(parents.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once it let go
    fcntl.flock(parents.fd, fcntl.LOCK_UN)
    asyncio.run(st.close())


def test_validate_key_refuses_exactly_the_keys_with_an_empty_dot_or_dotdot_segment():
    """validate_key splits a key into segments only when one could be bad (it holds '//',
    ends in '/', or has a segment starting '.'): the same keys pass as with a split always."""
    import random

    from qo.errors import InvalidInput
    from qo.storage import validate_key

    rng = random.Random(3)
    for _ in range(20000):
        key = "".join(rng.choice(["a", ".", "/", "..", "b.", ".c", "é"]) for _ in range(rng.randint(1, 8)))
        if key.startswith("/"):
            continue
        try:
            validate_key(key)
            passed = True
        except InvalidInput:
            passed = False
        assert passed == all(part not in ("", ".", "..") for part in key.split("/")), key
