"""Regressions found by the chaos test (tests/test_chaos.py), one focused test each."""

from __future__ import annotations

import asyncio

import qo
from qo import keys
from qo.errors import StorageUnavailable
from qo.model import Task, new_rev
from qo.transitions import Claimed, claim
from qo.worker import Worker


class LandsThenChanged:
    """A storage wrapper: the first write ``after_landing`` picks lands, another writer
    changes the object (the task it returns), then the write's response is lost."""

    def __init__(self, inner):
        self.inner, self.name, self.armed = inner, inner.name, True

    def __getattr__(self, name):  # get, delete, list, close: the inner storage's
        return getattr(self.inner, name)

    def after_landing(self, key, data, if_match, if_none_match) -> Task | None:
        raise NotImplementedError

    async def put(self, key, data, *, if_match=None, if_none_match=False):
        etag = await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)
        other = self.after_landing(key, data, if_match, if_none_match) if self.armed else None
        if other is not None:
            self.armed = False
            other.rev = new_rev()
            await self.inner.put(key, other.to_json(), if_match=etag)
            raise StorageUnavailable("injected: response lost", backend=self.name, key=key)
        return etag


class ClaimLandsThenFlagged(LandsThenChanged):
    """The claim's CAS lands, another writer changes the task (a dependent's submitter
    setting ``has_dependents``), then the claim's response is lost."""

    def after_landing(self, key, data, if_match, if_none_match):
        if if_match and "/tasks/" in key and Task.from_json(data).status == "running":
            other = Task.from_json(data)
            other.has_dependents = True
            return other
        return None


async def test_claim_whose_response_was_lost_is_ours_even_if_the_task_changed_since(storage_url):
    # Found by chaos: the claim CAS landed, its response was lost, and a submitter set
    # has_dependents before the claimer re-read. The claimer took it for a lost race and
    # dropped the lease from its record: the task stayed `running` under a lease nobody
    # held or could recover, and its dependents stayed blocked for ever.
    q = await qo.connect(storage_url, queue="reg", wrap_storage=ClaimLandsThenFlagged)
    task = await q.submit("t", 1)
    marker = keys.parse_marker((await q.storage.list(keys.ready_prefix("reg")))[0].key)
    got = await claim(q.store, marker, worker_id="w1", lease_id="lease-1", lease_ttl=30, now=q.clock.now())
    assert isinstance(got, Claimed), got
    stored = await q.get(task.id)
    assert stored.status == "running" and stored.lease_id == "lease-1" and stored.has_dependents
    assert got.task.rev == stored.rev  # the etag returned is the current version's
    await q.close()


async def test_worker_runs_a_task_whose_claim_response_was_lost(storage_url, fast_settings):
    q = await qo.connect(storage_url, queue="reg2", wrap_storage=ClaimLandsThenFlagged)
    task = await q.submit("t", 1)
    worker = Worker(q, settings=fast_settings)
    worker.handler("t")(lambda input: input + 1)
    await asyncio.wait_for(worker.run(until_idle=True), 20)
    done = await q.get(task.id)
    assert done.status == "completed" and done.output == 2 and done.attempt == 1
    await q.close()


class CreateLandsThenClaimed(LandsThenChanged):
    """A task's create-only write lands, a worker claims the task (its marker was written
    first), then the create's response is lost."""

    def after_landing(self, key, data, if_match, if_none_match):
        if if_none_match and "/tasks/" in key:
            other = Task.from_json(data)
            other.status, other.attempt, other.lease_id = "running", 1, "lease-x"
            return other
        return None


async def test_submit_whose_create_response_was_lost_succeeds_even_if_claimed_since(storage_url):
    # Found by chaos: the create landed, its response was lost, a worker claimed the
    # task before the producer re-read; the rev no longer matched, so submit raised
    # PreconditionFailed for a task that existed and ran (a producer retrying the
    # submit would then run the work twice).
    q = await qo.connect(storage_url, queue="reg3", wrap_storage=CreateLandsThenClaimed)
    task = await q.submit("t", {"n": 1})
    stored = await q.get(task.id)
    assert stored.status == "running" and stored.input == {"n": 1}
    assert [t.id async for t in q.list(limit=None)] == [task.id]
    await q.close()


async def test_submit_graph_whose_create_response_was_lost_succeeds(storage_url):
    q = await qo.connect(storage_url, queue="reg4", wrap_storage=CreateLandsThenClaimed)
    got = await q.submit_graph({"a": {"task_type": "t"}, "b": {"task_type": "t", "depends_on": ["a"]}})
    assert (await q.get(got["a"].id)).status == "running"
    assert (await q.get(got["b"].id)).status == "blocked"
    await q.close()


class RecordWriteLandsResponseLost:
    """The first conditional write of a worker record lands, but its response is lost."""

    def __init__(self, inner):
        self.inner, self.name, self.lost = inner, inner.name, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def put(self, key, data, **kw):
        etag = await self.inner.put(key, data, **kw)
        if "/workers/" in key and kw.get("if_match") and not self.lost:
            self.lost += 1
            raise qo.StorageUnavailable("response lost", backend=self.name, key=key)
        return etag


async def test_a_lost_response_to_our_own_record_write_is_not_an_eviction(storage_url):
    # Found by chaos: the retried CAS of a worker record whose first attempt landed was
    # refused, and the worker took its own write for recovery's takeover (a false
    # eviction, extra requests, and a re-created record).
    from qo.clock import FakeClock
    from qo.leases import LeaseBook

    q = await qo.connect(storage_url, queue="reg5", wrap_storage=RecordWriteLandsResponseLost, clock=FakeClock())
    book = LeaseBook(q.store, "w1", q.clock, lease_ttl=30)
    await book.announce({"0" * 24: {"lease": "L", "type": "t"}})
    q.clock.advance(5)
    await book.write()  # lands, response lost, retried: must be recognised as ours
    assert q.storage.lost == 1 and book.evictions == 0
    stored = await q.storage.get(book.key)
    assert stored.etag == book.etag
    await book.write()  # and the next write goes through with that etag
    assert book.evictions == 0
    await q.close()


async def test_a_worker_stopped_while_deleting_markers_deletes_them_on_its_way_out(storage_url):
    # Found by CI (Azurite's batch delete is slow): the worker's stop cancelled the
    # maintenance task in the middle of a marker batch delete; the batch was neither
    # deleted nor kept, and the claimed marker stayed in the ready index.
    import contextlib

    q = await qo.connect(storage_url, queue="reg6")
    worker = Worker(q)
    key = keys.ready(q.name, 5, 1_800_000_000.0, "0" * 24, "t")
    await worker.store.put_marker(key)
    delete_markers, started = worker.store.delete_markers, asyncio.Event()

    async def hangs(batch):
        started.set()
        await asyncio.Event().wait()

    worker.store.delete_markers = hangs
    worker.feed.drop_later(key)
    flushing = asyncio.create_task(worker.feed.flush())
    await started.wait()
    flushing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flushing
    assert worker.feed.trash == [key] and not worker.feed.deleting
    worker.store.delete_markers = delete_markers
    await worker.feed.flush()  # what the stopping worker does last
    assert [e.key for e in await q.storage.list(keys.ready_prefix(q.name))] == []
    await q.close()
