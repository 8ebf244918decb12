"""Dependencies on both backends: blocking, release, failure policies, graphs, races."""

from __future__ import annotations

import asyncio
import json
import multiprocessing

import pytest
from click.testing import CliRunner

import qo
from qo import keys
from qo.dependencies import MAX_DEPENDENCIES, MAX_INLINE_OUTPUT_BYTES, MAX_INLINE_OUTPUTS_BYTES, RESULTS_WINDOW
from qo.errors import StorageUnavailable
from qo.worker import Worker

CTX = multiprocessing.get_context("spawn")


def worker_for(queue, fast_settings, calls: list | None = None, fail: set | None = None) -> Worker:
    """A worker whose 'step' handler records its input and returns what its deps returned."""
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("step")
    async def step(input, ctx):
        if calls is not None:
            calls.append(input)
        if fail and input in fail:
            raise qo.Fail(f"{input} fails")
        return {"me": input, "deps": sorted(str(d["output"]) for d in ctx.dependencies.values())}

    return worker


async def test_a_chain_runs_in_order(queue, fast_settings):
    a = await queue.submit("step", "a")
    b = await queue.submit("step", "b", depends_on=[a.id])
    c = await queue.submit("step", "c", depends_on=[b.id])
    assert b.status == "blocked" and b.waiting_on == [a.id]
    assert await queue.storage.list(keys.ready_prefix(queue.name)) != []
    calls: list = []
    await worker_for(queue, fast_settings, calls).run(until_idle=True)
    assert calls == ["a", "b", "c"]
    assert (await queue.get(c.id)).status == "completed"
    assert await queue.storage.list(keys.deps_root(queue.name)) == []  # every edge consumed


async def test_a_diamond_passes_outputs_to_the_fan_in(queue, fast_settings):
    graph = await queue.submit_graph({
        "top": {"task_type": "step", "input": "top"},
        "left": {"task_type": "step", "input": "left", "depends_on": ["top"]},
        "right": {"task_type": "step", "input": "right", "depends_on": ["top"]},
        "join": {"task_type": "step", "input": "join", "depends_on": ["left", "right"], "priority": 200},
    })
    assert graph["join"].status == "blocked" and graph["join"].priority == 200
    await worker_for(queue, fast_settings).run(until_idle=True)
    join = await queue.get(graph["join"].id)
    assert join.status == "completed"
    assert join.output["deps"] == sorted([str({"deps": ["{'deps': [], 'me': 'top'}"], "me": "left"}),
                                          str({"deps": ["{'deps': [], 'me': 'top'}"], "me": "right"})])


#: dependents of one parent per backend: the emulated clouds run the same code, slower
DEPENDENTS = {"local": 200, "s3": 60, "azure": 60}


async def test_many_dependents_all_release(queue, backend, fast_settings):
    n = DEPENDENTS[backend]
    parent = await queue.submit("step", "parent")
    children = await queue.submit_many([("step", i, {"depends_on": [parent.id]}) for i in range(n)])
    assert {c.status for c in children} == {"blocked"}
    calls: list = []
    await worker_for(queue, fast_settings, calls).run(until_idle=True)
    assert sorted(c for c in calls if c != "parent") == list(range(n))
    statuses = {t.status async for t in queue.list(limit=None)}
    assert statuses == {"completed"}


async def test_already_completed_dependencies_count_as_met(queue, fast_settings):
    a = await queue.submit("step", "a")
    await worker_for(queue, fast_settings).run(until_idle=True)
    b = await queue.submit("step", "b", depends_on=[a.id])
    assert b.status == "pending" and b.waiting_on == []


@pytest.mark.parametrize("policy, expected", [("fail", "failed"), ("skip", "skipped"), ("run", "completed")])
async def test_failure_policies_propagate_three_levels(queue, fast_settings, policy, expected):
    root = await queue.submit("step", "root", max_retries=0)
    one = await queue.submit("step", "one", depends_on=[root.id], on_dependency_failure=policy)
    two = await queue.submit("step", "two", depends_on=[one.id], on_dependency_failure=policy)
    three = await queue.submit("step", "three", depends_on=[two.id], on_dependency_failure=policy)
    calls: list = []
    await worker_for(queue, fast_settings, calls, fail={"root"}).run(until_idle=True)
    assert (await queue.get(root.id)).status == "failed"
    for t in (one, two, three):
        got = await queue.get(t.id)
        assert got.status == expected
        if policy == "fail":
            assert got.last_error["type"] == "DependencyFailed"
    if policy == "fail":
        assert root.id in (await queue.get(one.id)).last_error["message"]
        assert calls == ["root"]
    if policy == "run":
        assert calls == ["root", "one", "two", "three"]
        assert (await queue.get(one.id)).output["deps"] == ["None"]  # it saw the failed dependency


async def test_the_handler_sees_each_dependency_status(queue, fast_settings):
    bad = await queue.submit("step", "bad", max_retries=0)
    good = await queue.submit("step", "good")
    seen = {}
    worker = Worker(queue, settings=fast_settings)

    @worker.handler("step")
    async def step(input, ctx):
        if input == "bad":
            raise qo.Fail("no")
        seen.update(ctx.dependencies)
        return input

    await queue.submit("step", "watcher", depends_on=[bad.id, good.id], on_dependency_failure="run")
    await worker.run(until_idle=True)
    assert seen[bad.id]["status"] == "failed" and seen[good.id] == {"status": "completed", "output": "good",
                                                                      "task_type": "step"}


async def test_cancelling_a_parent_fails_its_dependents(queue, fast_settings):
    parent = await queue.submit("step", "parent")
    child = await queue.submit("step", "child", depends_on=[parent.id])
    skipper = await queue.submit("step", "skipper", depends_on=[parent.id], on_dependency_failure="skip")
    await queue.cancel(parent.id)
    assert (await queue.get(child.id)).status == "failed"
    assert (await queue.get(skipper.id)).status == "skipped"
    assert "cancelled" in (await queue.get(child.id)).last_error["message"]


async def test_a_blocked_task_can_be_cancelled(queue, fast_settings):
    parent = await queue.submit("step", "parent")
    child = await queue.submit("step", "child", depends_on=[parent.id])
    assert (await queue.cancel(child.id)).status == "cancelled"
    calls: list = []
    await worker_for(queue, fast_settings, calls).run(until_idle=True)
    assert calls == ["parent"] and (await queue.get(child.id)).status == "cancelled"


async def test_unknown_ids_and_cycles_are_rejected_with_nothing_written(queue):
    real = await queue.submit("step", "real")
    before = [e.key for e in await queue.storage.list(f"{queue.name}/")]
    with pytest.raises(qo.DependencyError) as err:
        await queue.submit("step", "x", depends_on=[real.id, "f" * 24])
    assert "f" * 24 in str(err.value) and real.id not in str(err.value)
    with pytest.raises(qo.InvalidInput) as err:
        await queue.submit("step", "x", depends_on=["not-an-id"])
    assert err.value.field == "depends_on[0]"
    with pytest.raises(qo.InvalidInput):
        await queue.submit("step", "x", depends_on=[real.id], on_dependency_failure="ignore")
    with pytest.raises(qo.DependencyError) as err:
        await queue.submit_graph({
            "a": {"task_type": "step", "depends_on": ["c"]},
            "b": {"task_type": "step", "depends_on": ["a"]},
            "c": {"task_type": "step", "depends_on": ["b"]},
        })
    assert "cycle" in str(err.value) and "->" in str(err.value)
    assert {"a", "b", "c"} <= set(str(err.value).replace("->", " ").split())
    with pytest.raises(qo.DependencyError) as err:
        await queue.submit_graph({"a": {"task_type": "step", "depends_on": ["a"]}})
    assert "a -> a" in str(err.value)
    with pytest.raises(qo.DependencyError) as err:
        await queue.submit_graph({"a": {"task_type": "step", "depends_on": ["ghost"]}})
    assert "ghost" in str(err.value)
    with pytest.raises(qo.DependencyError):
        await queue.submit_graph({"a": {"task_type": "step", "depends_on": ["e" * 24]}})
    assert [e.key for e in await queue.storage.list(f"{queue.name}/")] == before


async def test_large_dependency_outputs_are_handed_by_reference(queue, fast_settings, monkeypatch):
    """A child of many parents with large outputs: small outputs stay inline (the old
    three keys), one over MAX_INLINE_OUTPUT_BYTES and those past the running total of
    MAX_INLINE_OUTPUTS_BYTES come as references, and the handler loads one on demand.
    Parents are read at most RESULTS_WINDOW at a time."""
    medium = 60_000  # each under the per-output cap; together over the total
    n_medium = MAX_INLINE_OUTPUTS_BYTES // (medium + 2) + 3
    worker = Worker(queue, settings=fast_settings)
    seen: dict = {}
    loaded: dict = {}

    @worker.handler("make")
    def make(input):
        return "x" * input

    @worker.handler("join")
    async def join(input, ctx):
        seen.update(ctx.dependencies)
        loaded["huge"] = await ctx.dependency_output(input["huge"])
        loaded["small"] = await ctx.dependency_output(input["small"])
        try:
            await ctx.dependency_output(ctx.task_id)
        except qo.InvalidInput as exc:
            loaded["refused"] = exc.field
        return "joined"

    small = await queue.submit("make", 10)
    huge = await queue.submit("make", MAX_INLINE_OUTPUT_BYTES + 1)
    mediums = await queue.submit_many([("make", medium) for _ in range(n_medium)], bulk=False)  # outputs inline up to 64 KiB
    await worker.run(until_idle=True)
    parents = [small.id, huge.id, *(m.id for m in mediums)]

    reading = peak = 0
    real_maybe = queue.dependencies._maybe

    async def counting_maybe(task_id, remember=False):
        nonlocal reading, peak
        reading += 1
        peak = max(peak, reading)
        try:
            await asyncio.sleep(0)
            return await real_maybe(task_id, remember)
        finally:
            reading -= 1

    child = await queue.submit("join", {"huge": huge.id, "small": small.id}, depends_on=parents)
    monkeypatch.setattr(queue.dependencies, "_maybe", counting_maybe)  # the child's reads from here on
    await worker.run(until_idle=True)
    assert (await queue.get(child.id)).output == "joined"

    assert seen[small.id] == {"status": "completed", "output": "x" * 10, "task_type": "make"}  # unchanged shape
    assert seen[huge.id] == {"status": "completed", "output": None, "task_type": "make", "output_ref": huge.id,
                             "output_bytes": MAX_INLINE_OUTPUT_BYTES + 3}
    fits = (MAX_INLINE_OUTPUTS_BYTES - 12) // (medium + 2)  # after the small one's 12 bytes
    assert 0 < fits < n_medium
    for i, m in enumerate(mediums):
        entry = seen[m.id]
        if i < fits:
            assert entry == {"status": "completed", "output": "x" * medium, "task_type": "make"}, i
        else:
            assert entry["output"] is None and entry["output_ref"] == m.id and entry["output_bytes"] == medium + 2
    inline = sum(len(json.dumps(e["output"])) for e in seen.values() if e["output"] is not None)
    assert inline <= MAX_INLINE_OUTPUTS_BYTES
    assert loaded == {"huge": "x" * (MAX_INLINE_OUTPUT_BYTES + 1), "small": "x" * 10, "refused": "task_id"}
    assert 1 < peak <= RESULTS_WINDOW


async def test_small_dependency_outputs_all_stay_inline(queue, fast_settings):
    """Under both caps nothing changes: every entry has exactly the three old keys."""
    worker = Worker(queue, settings=fast_settings)
    seen: dict = {}
    worker.handler("make")(lambda input: {"n": input, "pad": "y" * 1000})

    @worker.handler("join")
    async def join(input, ctx):
        seen.update(ctx.dependencies)

    parents = await queue.submit_many([("make", i) for i in range(40)])
    await queue.submit("join", None, depends_on=[p.id for p in parents])
    await worker.run(until_idle=True)
    assert seen == {p.id: {"status": "completed", "output": {"n": i, "pad": "y" * 1000}, "task_type": "make"}
                    for i, p in enumerate(parents)}


async def test_the_number_of_dependencies_is_capped(queue):
    """More than MAX_DEPENDENCIES distinct parents is refused naming depends_on, before any
    read or write (duplicates count once)."""
    ids = [f"{i:024x}" for i in range(MAX_DEPENDENCIES + 1)]
    with pytest.raises(qo.InvalidInput) as err:
        await queue.submit("step", "x", depends_on=ids)
    assert err.value.field == "depends_on" and f"limit is {MAX_DEPENDENCIES}" in str(err.value)
    with pytest.raises(qo.DependencyError):  # at the cap (with a duplicate): checked against the bucket
        await queue.submit("step", "x", depends_on=ids[:2] + ids[:1])
    assert await queue.storage.list(f"{queue.name}/") == []


def submit_child(url: str, parent_id: str, barrier) -> str:
    async def main() -> str:
        q = await qo.connect(url, queue="racing")
        barrier.wait()
        t = await q.submit("step", "child", depends_on=[parent_id])
        await q.close()
        return t.id

    return asyncio.run(main())


def complete_parent(url: str, parent_id: str, barrier) -> None:
    from qo.transitions import claim, completed, finish

    async def main() -> None:
        q = await qo.connect(url, queue="racing")
        task = await q.get(parent_id)
        marker = keys.parse_marker(task.marker_key("racing", q.clock.now()))
        got = await claim(q.store, marker, worker_id="w", lease_id="L", lease_ttl=30, now=q.clock.now())
        barrier.wait()
        now = q.clock.now()
        stored, _ = await finish(q.store, got.task, got.etag, completed("done", now), now)
        await q.dependencies.release(stored)
        await q.close()

    asyncio.run(main())


async def test_a_dependent_submitted_while_its_parent_completes_never_stays_blocked(storage_url):
    q = await qo.connect(storage_url, queue="racing")
    manager = CTX.Manager()
    loop = asyncio.get_running_loop()
    with CTX.Pool(4) as pool:
        for _ in range(6):
            parent = await q.submit("step", "parent")
            barrier = manager.Barrier(4)
            jobs = [pool.apply_async(complete_parent, (storage_url, parent.id, barrier))]
            jobs += [pool.apply_async(submit_child, (storage_url, parent.id, barrier)) for _ in range(3)]
            results = await loop.run_in_executor(None, lambda: [j.get(timeout=60) for j in jobs])
            for child_id in results[1:]:
                child = await q.get(child_id)
                assert child.status == "pending", (child.status, child.waiting_on)
                # its marker exists (ready or delayed, as the releaser's clock judged)
                markers = [keys.ready("racing", child.priority, child.available_at, child.id, "step"),
                           keys.delayed("racing", child.priority, child.available_at, child.id, "step")]
                found = [e.key for m in markers for e in await q.storage.list(m)]
                assert len(found) >= 1, markers
    manager.shutdown()
    await q.close()


class LosesReleases:
    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def list(self, prefix, **kw):
        if "/deps/" in prefix:
            raise StorageUnavailable("injected", backend=self.name, key=prefix)
        return await self.inner.list(prefix, **kw)


async def test_a_wake_up_lost_to_a_crash_is_repaired_by_the_sweep(storage_url, fast_settings):
    crashy = await qo.connect(storage_url, queue="lost", wrap_storage=LosesReleases)
    crashy.store.backoff.attempts = 1
    parent = await crashy.submit("step", "parent")
    child = await crashy.submit("step", "child", depends_on=[parent.id])
    worker = Worker(crashy, settings=fast_settings)
    worker.handler("step")(lambda input: input)
    run = asyncio.create_task(worker.run())
    await crashy.wait(parent.id, timeout=10)
    worker.stop()
    await run
    assert (await crashy.get(child.id)).status == "blocked"  # its wake-up was lost
    await crashy.close()

    q = await qo.connect(storage_url, queue="lost")
    repaired = Worker(q, settings=fast_settings, dependency_sweep_interval=0.05)
    repaired.handler("step")(lambda input: input)
    await asyncio.wait_for(repaired.run(until_idle=True), 20)
    assert (await q.get(child.id)).status == "completed"
    await q.close()


def test_cli_depends_on_and_status(storage_url):
    from qo.cli import cli

    runner = CliRunner()
    parent = runner.invoke(cli, ["submit", "step", "--url", storage_url]).output.strip()
    child = runner.invoke(cli, ["submit", "step", "--depends-on", parent, "--on-dependency-failure", "skip",
                                "--url", storage_url])
    assert child.exit_code == 0
    status = runner.invoke(cli, ["status", child.output.strip(), "--url", storage_url])
    assert "blocked" in status.output and f"waiting on: {parent}" in status.output
    assert "if one fails: skip" in status.output
    unknown = runner.invoke(cli, ["submit", "step", "--depends-on", "a" * 24, "--url", storage_url])
    assert unknown.exit_code == 1 and "a" * 24 in unknown.output
