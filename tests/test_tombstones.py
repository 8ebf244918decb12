"""A delete loses to any change made after its writer read the object (issue 26 item 1,
issue 27 item 2), without resting on a conditional DELETE: Ceph RGW 16 ignores
``If-Match`` on DELETE and LocalStack 4 refuses it. The deleter tombstones the version it
read by CAS, then deletes (qo/tombstones.py). Each race is driven by hand, on every
backend, and each store here is also made to ignore ``If-Match`` on DELETE as RGW does."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

import qo
from qo import keys, tombstones
from qo.clock import FakeClock
from qo.errors import StorageUnavailable, TaskNotFound
from qo.idempotency import record_key, sweep_expired, sweep_expiry_index
from qo.leases import LeaseBook, sweep
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.2, buffer_max_age=0.5)
DAY = 86400.0


def like_rgw(q) -> None:
    """Make ``q``'s store ignore ``If-Match`` on DELETE, as Ceph RGW 16 does."""
    storage = q.store.storage
    real = storage.delete

    async def delete(key, *, if_match=None):
        await real(key)

    storage.delete = delete


def after_get(q, key: str, action) -> list:
    """Run ``action()`` once, right after ``q``'s first GET of ``key`` has been answered
    (between a reader's read and its write); returns the list its result lands in."""
    storage = q.store.storage
    real = storage.get
    done: list = []
    started: list = []

    async def get(k):
        blob = await real(k)
        if k == key and not started:
            started.append(k)
            done.append(await action())
        return blob

    storage.get = get
    return done


async def run_all(q, **handlers) -> None:
    w = Worker(q, concurrency=4, **FAST)
    for name, fn in handlers.items():
        w.handler(name)(fn)
    await asyncio.wait_for(w.run(until_idle=True), 60)


def fail(input):
    raise qo.Fail("no")


async def later(url: str, days: float) -> qo.Queue:
    return await qo.connect(url, queue="q", clock=FakeClock(time.time() + days * DAY))


async def dead_letter(url: str) -> tuple[qo.Queue, qo.Task]:
    q = await qo.connect(url, queue="q")
    task = await q.submit("bad", 1, max_retries=0)
    await run_all(q, bad=fail)
    assert (await q.get(task.id)).status == "failed"
    return q, task


@pytest.mark.parametrize("rgw", [False, True], ids=["store", "rgw-delete"])
async def test_a_purge_loses_to_a_retry_made_after_it_read_the_task(storage_url, rgw):
    q, task = await dead_letter(storage_url)
    purger = await later(storage_url, 40)  # past the 30 days of failed retention
    if rgw:
        like_rgw(purger)
    retried = after_get(purger, keys.task("q", task.id), lambda: q.retry(task.id))
    deleted = await purger.purge("failed", dt.timedelta(days=1))
    assert retried and retried[0].status == "pending"  # what the caller was told ...
    assert deleted == 0
    assert (await q.get(task.id)).status == "pending"  # ... is what is stored
    await run_all(q, bad=lambda input: "fine now")  # and a worker finds it: its marker is there
    assert (await q.get(task.id)).status == "completed"
    for x in (q, purger):
        await x.close()


async def test_a_task_being_purged_refuses_a_retry_and_a_cancel_cleanly(storage_url):
    q, task = await dead_letter(storage_url)
    purger = await later(storage_url, 40)
    refused: list = []
    real = purger.store.delete_markers

    async def delete_markers(doomed):
        if keys.task("q", task.id) in doomed and not refused:
            for act in (q.retry, q.cancel):  # between the tombstone and the delete
                with pytest.raises(TaskNotFound, match="purge"):
                    await act(task.id)
                refused.append(act)
        await real(doomed)

    purger.store.delete_markers = delete_markers
    assert await purger.purge("failed", dt.timedelta(days=1)) == 1
    assert len(refused) == 2
    with pytest.raises(TaskNotFound):
        await q.get(task.id)
    assert await q.storage.list("q/ready/") == [] and await q.storage.list("q/delayed/") == []  # no marker left
    for x in (q, purger):
        await x.close()


async def test_a_purge_that_stopped_after_its_tombstone_is_finished_by_the_next(storage_url):
    q, task = await dead_letter(storage_url)
    purger = await later(storage_url, 40)
    real = purger.store.delete_markers

    async def broken(doomed):
        raise StorageUnavailable("down", backend="test")

    purger.store.delete_markers = broken
    with pytest.raises(StorageUnavailable):
        await purger.purge("failed", dt.timedelta(days=1))
    with pytest.raises(TaskNotFound, match="purge"):  # a tombstone: gone for every reader
        await q.get(task.id)
    assert [t.id async for t in q.list(status="failed")] == []
    purger.store.delete_markers = real
    assert await purger.purge("failed", dt.timedelta(days=1)) == 1
    assert await q.storage.list(keys.task("q", task.id)) == []
    assert await q.storage.list(keys.ended_prefix("q")) == []
    for x in (q, purger):
        await x.close()


async def test_a_pack_purge_loses_to_a_retry_of_a_task_that_moved_out(storage_url):
    q = await qo.connect(storage_url, queue="q")
    a, b = await q.submit_many([("bad", 1, {"max_retries": 0}), ("bad", 2, {"max_retries": 0})])
    assert keys.pack_of(a.id) is not None  # a pack
    await run_all(q, bad=fail)
    await q.retry(a.id)  # a moves out of its pack into an object of its own ...
    await run_all(q, bad=fail)  # ... and fails again: the pack is done, both dead letters
    purger = await later(storage_url, 40)
    like_rgw(purger)
    retried = after_get(purger, keys.task("q", a.id), lambda: q.retry(a.id))
    await purger.purge("failed", dt.timedelta(days=1))
    assert retried and retried[0].status == "pending"
    assert (await q.get(a.id)).status == "pending"  # kept: it lives without its pack
    with pytest.raises(TaskNotFound):
        await q.get(b.id)  # its pack went, with b
    await run_all(q, bad=lambda input: "fine")
    assert (await q.get(a.id)).status == "completed"
    for x in (q, purger):
        await x.close()


async def test_a_pack_purge_loses_to_a_retry_of_a_task_inside_it(storage_url):
    q = await qo.connect(storage_url, queue="q")
    a, b = await q.submit_many([("bad", 1, {"max_retries": 0}), ("bad", 2, {"max_retries": 0})])
    await run_all(q, bad=fail)
    purger = await later(storage_url, 40)
    like_rgw(purger)
    pack_id = keys.pack_of(a.id)[0]
    retried = after_get(purger, keys.pack("q", pack_id), lambda: q.retry(b.id))
    await purger.purge("failed", dt.timedelta(days=1))
    assert retried and retried[0].status == "pending"
    assert (await q.get(b.id)).status == "pending"
    assert (await q.get(a.id)).status == "failed"  # the pack stays whole: it changed after the read
    for x in (q, purger):
        await x.close()


@pytest.mark.parametrize("sweeper", [sweep_expired, sweep_expiry_index], ids=["records", "expiry-index"])
async def test_an_idempotency_sweep_loses_to_a_submit_that_renewed_the_key(storage_url, sweeper):
    q = await qo.connect(storage_url, queue="q")
    first = await q.submit("t", 1, idempotency_key="order-1", idempotency_ttl_days=1)
    sweeper_q = await later(storage_url, 2)  # the record expired a day ago
    producer = await later(storage_url, 2)
    like_rgw(sweeper_q)
    key = record_key("q", "type.t", "order-1")
    renewed = after_get(sweeper_q, key, lambda: producer.submit("t", 1, idempotency_key="order-1",
                                                                idempotency_ttl_days=10))
    if sweeper is sweep_expired:
        await sweeper(sweeper_q, None)
    else:
        await sweeper(sweeper_q)
    assert renewed and renewed[0].id != first.id  # expired: the key names a new task now
    again = await producer.submit("t", 1, idempotency_key="order-1", idempotency_ttl_days=10)
    assert again.id == renewed[0].id  # the renewed record survived the sweep: no duplicate
    for x in (q, sweeper_q, producer):
        await x.close()


async def test_a_submit_waits_out_a_young_tombstone_and_takes_over_an_old_one(storage_url):
    q = await qo.connect(storage_url, queue="q", clock=FakeClock(time.time()))
    key = record_key("q", "type.t", "k")
    await q.storage.put(key, tombstones.tombstone(q.clock.now(), "expired"))

    async def sweeper_deletes_it():
        await asyncio.sleep(0.2)
        await q.storage.delete(key)

    deleting = asyncio.ensure_future(sweeper_deletes_it())
    task = await q.submit("t", 1, idempotency_key="k")  # waits for the young one to go
    await deleting
    assert (await q.submit("t", 1, idempotency_key="k")).id == task.id
    # a tombstone whose sweeper died: old after the grace, taken over by CAS
    key2 = record_key("q", "type.t", "k2")
    await q.storage.put(key2, tombstones.tombstone(q.clock.now() - tombstones.GRACE - 1, "expired"))
    other = await q.submit("t", 2, idempotency_key="k2")
    assert (await q.submit("t", 2, idempotency_key="k2")).id == other.id
    await q.close()


async def test_an_old_tombstone_is_cleared_by_a_sweep_and_a_young_one_left_to_its_maker(storage_url):
    q = await qo.connect(storage_url, queue="q", clock=FakeClock(time.time()))
    young, old = record_key("q", "type.t", "young"), record_key("q", "type.t", "old")
    await q.storage.put(young, tombstones.tombstone(q.clock.now(), "expired"))
    await q.storage.put(old, tombstones.tombstone(q.clock.now() - tombstones.GRACE - 1, "expired"))
    await sweep_expired(q, None)
    assert [e.key for e in await q.storage.list(keys.idem_prefix("q"))] == [young]
    assert q.store.bad.count == 0  # a tombstone is not garbage
    await q.close()


async def test_a_worker_record_sweep_loses_to_a_worker_that_came_back(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="q", clock=clock)
    like_rgw(q)
    book = LeaseBook(q.store, "worker-a", clock, lease_ttl=30)
    await book.write()
    clock.advance(31)  # silent past its lease: presumed dead by a sweep that reads it ...
    after_get(q, book.key, book.write)  # ... while it writes its record again
    report = await sweep(q.store, clock, self_id="other")
    assert "worker-a" not in report.alive
    assert [e.key for e in await q.storage.list(keys.workers_prefix("q"))] == [book.key]  # kept
    blob = await q.storage.get(book.key)
    assert not tombstones.is_tombstone(blob.data) and book.etag == blob.etag
    await q.close()


async def test_a_worker_does_not_write_over_a_young_tombstone_of_its_record(storage_url):
    clock = FakeClock()
    q = await qo.connect(storage_url, queue="q", clock=clock)
    book = LeaseBook(q.store, "worker-a", clock, lease_ttl=30)
    await q.storage.put(book.key, tombstones.tombstone(clock.now(), "worker presumed dead"))
    with pytest.raises(StorageUnavailable, match="being deleted"):
        await book.write()
    assert tombstones.is_tombstone((await q.storage.get(book.key)).data)
    clock.advance(tombstones.GRACE + 1)  # its sweeper died: ours again
    await book.write()
    assert not tombstones.is_tombstone((await q.storage.get(book.key)).data)
    await q.close()
