"""Large payloads (issue 16, item 6; docs/architecture.md §5i): inputs and outputs over
64 KiB encoded are stored as objects of their own and read on demand, so the task
object, read on every claim and CASed on every change, stays small. Every test runs on
local, S3 (moto) and Azure (Azurite)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import pytest
from click.testing import CliRunner

import qo
from qo import keys, model
from qo.cli import build_cli
from qo.clock import FakeClock
from qo.counting import CountingStorage
from qo.transitions import abandoned
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5, shutdown_timeout=5.0)
BIG_INPUT = {"blob": "i" * 200_000}  # ~200 KB encoded
BIG_OUTPUT = "o" * 300_000  # ~300 KB encoded


async def drain(q: qo.Queue, **handlers) -> Worker:
    """Run a worker with ``handlers`` until nothing of theirs is left."""
    w = Worker(q, **FAST)
    for name, fn in handlers.items():
        w.handler(name)(fn)
    await asyncio.wait_for(w.run(until_idle=True), 60)
    return w


async def payload_keys(q: qo.Queue, task_id: str | None = None) -> list[str]:
    prefix = keys.payloads_prefix(q.name, task_id) if task_id else f"{q.name}/payloads/"
    return sorted(e.key for e in await q.storage.list(prefix))


async def stored_size(q: qo.Queue, task_id: str) -> int:
    return len((await q.storage.get(keys.task(q.name, task_id))).data)


async def test_a_large_input_is_stored_apart_and_the_handler_sees_all_of_it(queue):
    task = await queue.submit("big", BIG_INPUT)
    assert task.input is None and task.input_ref["key"] == keys.payload_input(queue.name, task.id)
    assert task.input_ref["bytes"] == len(model.dumps(BIG_INPUT))
    assert await payload_keys(queue, task.id) == [keys.payload_input(queue.name, task.id)]
    assert await stored_size(queue, task.id) < 4096  # the object every claim reads stays small
    got = await queue.get(task.id)  # one GET: the reference, not the value
    assert got.input is None and got.input_ref == task.input_ref
    assert await queue.payload(got, "input") == BIG_INPUT

    seen: list = []

    def big(input, ctx):
        seen.append(input)
        assert ctx.task.input is None  # the value is handed over, never put back inline
        return len(input["blob"])

    await drain(queue, big=big)
    done = await queue.get(task.id)
    assert seen == [BIG_INPUT]
    assert (done.status, done.output, done.output_ref) == ("completed", 200_000, None)
    assert await stored_size(queue, task.id) < 4096  # the finish CAS did not write the input back


async def test_a_large_output_is_stored_apart_and_read_on_demand(queue):
    task = await queue.submit("make", 300_000)
    await drain(queue, make=lambda n: "o" * n)
    done = await queue.get(task.id)
    assert done.status == "completed" and done.output is None
    ref = done.output_ref
    assert ref["key"].startswith(keys.payloads_prefix(queue.name, task.id) + "output-1-")
    assert ref["bytes"] == 300_002
    assert await stored_size(queue, task.id) < 4096
    assert await queue.payload(done) == BIG_OUTPUT
    assert await queue.payload(done, "input") == 300_000  # an inline value comes back as is
    with pytest.raises(qo.InvalidInput):
        await queue.payload(done, "both")


async def test_small_values_stay_inline_and_a_small_submit_still_costs_two_requests(storage_url):
    q = await qo.connect(storage_url, queue="q", wrap_storage=CountingStorage)
    try:
        await q.submit("t", None)  # reads the queue's settings once (cached): not a submit's cost
        q.storage.reset()
        small = await q.submit("t", {"x": "s" * (model.PAYLOAD_INLINE_BYTES - 100)})
        assert q.storage.counts() == {"PUT": 1, "PUT_COND": 1}  # marker + task, as before
        assert small.input_ref is None and small.input is not None
        q.storage.reset()
        await q.submit("t", BIG_INPUT)
        assert q.storage.counts() == {"PUT_COND": 2, "PUT": 1}  # payload (create-only), marker, task
        await drain(q, t=lambda input: "ok")
        assert len(await payload_keys(q)) == 1  # the big input only
    finally:
        await q.close()


async def test_a_child_gets_a_parent_output_stored_apart_by_reference(queue):
    parent = await queue.submit("make", 300_000)
    got: dict = {}

    async def child(input, ctx):
        got["entry"] = ctx.dependencies[parent.id]
        got["value"] = await ctx.dependency_output(parent.id)
        return "done"

    kid = await queue.submit("child", None, depends_on=[parent.id])
    await drain(queue, make=lambda n: "o" * n, child=child)
    assert (await queue.get(kid.id)).output == "done"
    assert got["entry"] == {"status": "completed", "output": None, "task_type": "make",
                            "output_ref": parent.id, "output_bytes": 300_002}
    assert got["value"] == BIG_OUTPUT


async def test_each_attempt_writes_its_own_output_key_and_a_lost_lease_deletes_its_own(queue):
    """Attempt 1's lease is taken over while it runs (as recovery does); its output is PUT
    but not recorded, and deleted. Attempt 2 stores its output at a key of its own."""
    task = await queue.submit("flaky", BIG_INPUT, max_retries=3)
    attempts: list[int] = []

    async def flaky(input, ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:  # another worker's recovery takes the task over meanwhile
            current, etag = await queue.store.load(task.id)
            now = queue.clock.now()
            abandoned("lease expired (test)", now)(current)
            await queue.store.replace(current, etag)
            await queue.store.put_marker(current.marker_key(queue.name, now))
            return "first " + "1" * 100_000
        return "second " + "2" * 100_000

    w = await drain(queue, flaky=flaky)
    assert attempts == [1, 2] and w.stats["lost_lease"] == 1
    done = await queue.get(task.id)
    assert done.status == "completed" and done.attempt == 2
    assert "/output-2-" in done.output_ref["key"]
    assert (await queue.payload(done)).startswith("second ")
    # attempt 1's object was deleted by its own worker; attempt 2's and the input remain
    assert await payload_keys(queue, task.id) == sorted([done.input_ref["key"], done.output_ref["key"]])


async def test_purge_deletes_the_payloads_with_their_task(storage_url):
    q = await qo.connect(storage_url, queue="q")
    try:
        apart = await q.submit("make", BIG_INPUT)
        inline = await q.submit("make", {"n": 1})
        await drain(q, make=lambda input: "o" * 300_000 if "blob" in input else "small")
        assert len(await payload_keys(q, apart.id)) == 2
        other = await q.submit("keep", BIG_INPUT)  # pending: not purged, its payload stays
        future = await qo.connect(storage_url, queue="q", clock=FakeClock(time.time() + 8 * 86400))
        try:
            assert await future.purge("completed", dt.timedelta(days=1)) == 2
        finally:
            await future.close()
        assert await payload_keys(q) == [keys.payload_input(q.name, other.id)]
        with pytest.raises(qo.TaskNotFound):
            await q.get(apart.id)
        with pytest.raises(qo.TaskNotFound):
            await q.get(inline.id)
    finally:
        await q.close()


async def test_an_altered_or_missing_payload_fails_the_attempt_naming_its_key(queue):
    edited = await queue.submit("big", BIG_INPUT, max_retries=3)
    missing = await queue.submit("big", {"blob": "m" * 200_000}, max_retries=3)
    # hand-edited: still JSON, another value (the checksum catches it)
    await queue.storage.put(edited.input_ref["key"], json.dumps({"blob": "x"}).encode())
    await queue.storage.delete(missing.input_ref["key"])
    ran: list = []
    w = await drain(queue, big=lambda input: ran.append(input))
    assert ran == [] and w.stats["errors"] == 0  # no raw exception reached the slot
    for task in (edited, missing):
        failed = await queue.get(task.id)
        assert failed.status == "failed" and failed.attempt == 1  # no retry: it will not heal
        assert failed.last_error["type"] == "Fail"
        assert task.input_ref["key"] in failed.last_error["message"]
        assert "stored apart" in failed.last_error["message"]
    with pytest.raises(qo.CorruptObject) as err:
        await queue.payload(await queue.get(edited.id), "input")
    assert err.value.key == edited.input_ref["key"]


async def test_over_the_cap_is_refused_naming_the_field(queue, monkeypatch):
    monkeypatch.setattr(model, "MAX_PAYLOAD_BYTES", 150_000)
    with pytest.raises(qo.InvalidInput) as err:
        await queue.submit("big", BIG_INPUT)
    assert err.value.field == "input" and "150000" in str(err.value)
    assert await queue.storage.list(f"{queue.name}/") == []  # nothing written

    task = await queue.submit("make", 200_000)
    w = await drain(queue, make=lambda n: "o" * n)
    failed = await queue.get(task.id)
    assert failed.status == "failed" and failed.attempt == 1 and failed.output_ref is None
    assert "output" in failed.last_error["message"] and "150000" in failed.last_error["message"]
    assert await payload_keys(queue) == [] and w.stats["errors"] == 0


async def test_a_reference_outside_its_task_is_refused(queue):
    a = await queue.submit("big", BIG_INPUT)
    b = await queue.submit("big", {"blob": "b" * 200_000})
    current, etag = await queue.store.load(b.id)
    current.input_ref = dict(a.input_ref)  # hand-edited to name another task's payload
    await queue.store.replace(current, etag)
    with pytest.raises(qo.CorruptObject) as err:
        await queue.payload(await queue.get(b.id), "input")
    assert "not a payload of this task" in str(err.value)


def test_cli_submits_a_5_mb_input_and_status_shows_and_prints_payloads(storage_url, tmp_path):
    runner = CliRunner()

    def cli(*args: str):
        result = runner.invoke(build_cli(), [*args, "--url", storage_url, "--queue", "q"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    big = tmp_path / "big.json"
    value = {"rows": ["r" * 1000] * 5000}  # ~5 MB
    big.write_text(json.dumps(value))
    assert big.stat().st_size > 5_000_000
    task_id = cli("submit", "make", "--input", f"@{big}").strip()

    async def work() -> None:
        async with await qo.connect(storage_url, queue="q") as q:
            await drain(q, make=lambda input: "o" * 300_000 if input == value else None)

    asyncio.run(work())
    human = cli("status", task_id)
    assert "input:      4.8 MiB stored apart" in human
    assert f"output:     293.0 KiB stored apart (qo status {task_id} --payloads to print it)" in human
    assert "completed" in human and "r" * 1000 not in human
    printed = cli("status", task_id, "--payloads")
    assert json.dumps(BIG_OUTPUT) in printed and "r" * 1000 in printed
    as_json = json.loads(cli("status", task_id, "--json"))
    assert as_json["input"] is None and as_json["output"] is None
    assert as_json["output_ref"]["bytes"] == 300_002 and as_json["input_ref"]["key"].endswith("/input.json")
    full = json.loads(cli("status", task_id, "--json", "--payloads"))
    assert full["input"] == value and full["output"] == BIG_OUTPUT


# -- tampered references (issue 26 item 13) -----------------------------------------------


async def tamper(q: qo.Queue, task_id: str, **fields) -> None:
    """Rewrite ``tasks/{id}.json`` by hand, as a hostile or careless operator would."""
    key = keys.task(q.name, task_id)
    d = json.loads((await q.storage.get(key)).data)
    d.update(fields)
    await q.storage.put(key, json.dumps(d).encode())


def ref_of(key: str, data: bytes) -> dict:
    import hashlib

    return {"key": key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def tampered_refs(q: qo.Queue, victim: qo.Task, which: str, targets: list[qo.Task]) -> dict[str, str]:
    """Each of ``targets`` gets its ``{which}_ref`` (or the object it names) tampered one
    way; returns task id -> the way. ``victim``'s payload holds the data no other task
    may ever be handed."""
    vref = getattr(victim, f"{which}_ref")
    secret = (await q.storage.get(vref["key"])).data
    task_object = (await q.storage.get(keys.task(q.name, victim.id))).data
    ways: dict[str, str] = {}

    async def way(name: str, target: qo.Task, **ref) -> None:
        ways[target.id] = name
        if ref:
            await tamper(q, target.id, **{f"{which}_ref": ref})

    own = [getattr(t, f"{which}_ref") for t in targets]
    it = iter(zip(targets, own))
    t, r = next(it)
    await way("another task's payload", t, **vref)
    t, r = next(it)
    await way("a task object", t, **ref_of(keys.task(q.name, victim.id), task_object))
    t, r = next(it)
    elsewhere = f"elsewhere/payloads/{t.id}/{r['key'].rsplit('/', 1)[1]}"  # another queue's, same id
    await q.storage.put(elsewhere, secret)
    await way("another queue's payload", t, **ref_of(elsewhere, secret))
    t, r = next(it)
    await way("a path that climbs out", t, **{**vref, "key": f"{q.name}/payloads/{t.id}/../{victim.id}/"
                                                          + vref["key"].rsplit("/", 1)[1]})
    t, r = next(it)
    await q.storage.delete(r["key"])
    await way("missing", t)
    t, r = next(it)
    data = (await q.storage.get(r["key"])).data
    await q.storage.put(r["key"], data + b"    ")  # still JSON, longer than its record says
    await way("longer", t)
    t, r = next(it)
    await q.storage.put(r["key"], model.dumps("short"))  # shorter
    await way("shorter", t)
    t, r = next(it)
    data = (await q.storage.get(r["key"])).data
    await q.storage.put(r["key"], data.replace(b"x", b"y", 1))  # same length, another digest
    await way("another digest", t)
    t, r = next(it)
    await way("a size past the cap", t, **{**r, "bytes": model.MAX_PAYLOAD_BYTES * 1000})
    t, r = next(it)  # under this task's prefix, but the other kind: its input as output, or back
    crossed = keys.payload_input(q.name, t.id) if which == "output" else keys.payload_output(q.name, t.id, 1, "zz")
    await q.storage.put(crossed, secret)
    await way("its other payload", t, **ref_of(crossed, secret))
    assert next(it, None) is None
    return ways


N_WAYS = 10


async def test_a_tampered_input_ref_fails_that_task_alone_and_never_hands_over_another_s_input(queue):
    secret = {"blob": "s" * 200_000}
    victim = await queue.submit("big", secret)
    targets = [await queue.submit("big", {"blob": "x" * 200_000 + str(i)}, max_retries=3) for i in range(N_WAYS)]
    ways = await tampered_refs(queue, victim, "input", targets)
    seen: list = []
    w = await drain(queue, big=lambda input: seen.append(input) or "ok")
    assert seen == [secret]  # the victim ran, on its own input; no tampered task ran at all
    assert (await queue.get(victim.id)).status == "completed"
    assert w.stats["errors"] == 0  # no raw exception reached the worker loop
    for task in targets:
        failed = await queue.get(task.id)
        assert (failed.status, failed.attempt) == ("failed", 1), ways[task.id]  # no retry: it will not heal
        assert failed.last_error["type"] == "Fail", ways[task.id]
        message = failed.last_error["message"]
        assert "input" in message and task.id in message, (ways[task.id], message)
        with pytest.raises(qo.CorruptObject) as err:
            await queue.payload(failed, "input")
        assert task.id in str(err.value) and "input" in str(err.value), ways[task.id]


async def test_a_tampered_output_ref_raises_a_clear_error_naming_the_task_and_field(queue):
    victim = await queue.submit("make", "s")
    targets = [await queue.submit("make", "x") for _ in range(N_WAYS)]
    await drain(queue, make=lambda c: c * 300_000)
    victim, targets = await queue.get(victim.id), [await queue.get(t.id) for t in targets]
    ways = await tampered_refs(queue, victim, "output", targets)
    assert await queue.payload(await queue.get(victim.id)) == "s" * 300_000
    for task in targets:
        got = await queue.get(task.id)
        with pytest.raises(qo.CorruptObject) as err:
            await queue.payload(got, "output")
        assert task.id in str(err.value) and "output" in str(err.value), ways[task.id]


async def test_a_tampered_ref_in_a_pack_entry_or_a_parent_costs_only_its_own_task(queue):
    """The same through the other readers: a task of a pack whose entry names another
    task's payload fails alone (its siblings run); a child reading a parent's tampered
    output with ``ctx.dependency_output`` gets a ``CorruptObject`` naming the parent."""
    secret = {"blob": "s" * 200_000}
    victim = await queue.submit("big", secret)
    packed = await queue.submit_many([("small", i, {"max_retries": 3}) for i in range(3)])
    pack_key = keys.pack(queue.name, keys.pack_of(packed[0].id)[0])
    d = json.loads((await queue.storage.get(pack_key)).data)
    d["entries"][1].update(input=None, input_ref=victim.input_ref)
    await queue.storage.put(pack_key, json.dumps(d).encode())
    seen: list = []
    w = await drain(queue, big=lambda input: "ok", small=lambda input: seen.append(input))
    assert sorted(seen) == [0, 2] and w.stats["errors"] == 0
    failed = await queue.get(packed[1].id)
    assert (failed.status, failed.attempt, failed.last_error["type"]) == ("failed", 1, "Fail")
    assert packed[1].id in failed.last_error["message"]

    parent = await queue.submit("make", 300_000)
    other = await queue.submit("make", 300_001)
    await drain(queue, make=lambda n: "p" * n)
    await tamper(queue, parent.id, output_ref=(await queue.get(other.id)).output_ref)
    child = await queue.submit("child", None, depends_on=[parent.id])
    errors: list = []

    async def read_parent(input, ctx):
        try:
            return len(await ctx.dependency_output(parent.id))
        except qo.CorruptObject as exc:
            errors.append(str(exc))
            raise

    w = await drain(queue, child=read_parent)
    assert w.stats["errors"] == 0 and errors and all(parent.id in e and "output" in e for e in errors)
    done = await queue.get(child.id)
    assert done.status == "failed" and done.last_error["type"] == "CorruptObject"


def test_cli_status_of_a_tampered_payload_is_one_line(storage_url):
    async def setup() -> str:
        async with await qo.connect(storage_url, queue="q") as q:
            a, b = await q.submit("big", BIG_INPUT), await q.submit("big", {"blob": "b" * 200_000})
            await tamper(q, b.id, input_ref=a.input_ref)
            return b.id

    task_id = asyncio.run(setup())
    result = CliRunner().invoke(build_cli(), ["status", task_id, "--payloads", "--url", storage_url, "--queue", "q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and task_id in lines[0] and "input_ref" in lines[0], result.stderr
    assert "i" * 1000 not in result.output  # the other task's input is never printed
