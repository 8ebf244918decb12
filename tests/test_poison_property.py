"""Property (issue 15): whatever bytes or JSON land at whatever keys of a queue while a
producer, a worker and a scheduler run, every good task completes, the scheduler fires
its good schedule, nothing raises out of a loop, and `qo doctor --scan` names every
object that is not one qo can read."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qo
from qo import keys
from qo.clock import FakeClock
from qo.scan import scan
from qo.scheduler import Scheduler
from qo.worker import Worker

FAST = dict(poll_min=0.01, poll_max=0.05, sweep_interval=0.1, buffer_max_age=0.3, orphan_grace=0.5)
EXAMPLES = {"local": 25, "s3": 6, "azure": 6}

TASK_IDS = st.text("0123456789abcdef", min_size=24, max_size=24)
FOLDERS = st.one_of(
    TASK_IDS.map(lambda i: f"tasks/{i}.json"),
    st.sampled_from(["workers/evil.json", "workers/w-1.json", "schedules/zbad.json", "schedules/tick2.json",
                     "limits/defs/global.json", "limits/defs/type.t.json", "limits/state/global.json",
                     "limits/state/type.t.json", "settings.json", "idem/type.t/" + "a" * 64 + ".json"]),
    st.tuples(TASK_IDS, st.sampled_from(["t", "other"])).map(  # a marker, so a worker meets the task
        lambda p: f"ready/127/{1_700_000_000_000}-{p[0]}-{p[1]}"),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
# shapes close to qo's own records, with a wrong field: the garbage most likely to get far
TASKISH = st.fixed_dictionaries({
    "id": TASK_IDS, "task_type": st.sampled_from(["t", "other", 5, None]),
    "status": st.sampled_from(["pending", "running", "bogus", 3]),
}, optional={"timeout_seconds": JSON, "priority": JSON, "attempt": JSON, "depends_on": JSON,
             "lease_ttl": JSON, "leases": JSON, "heartbeat_at": JSON, "worker_id": JSON,
             "cron": JSON, "name": JSON, "next_fire_at": JSON, "rate": JSON, "scope": JSON,
             "tokens": JSON, "at": JSON, "running": JSON, "settings": JSON})
PAYLOADS = st.one_of(
    st.binary(max_size=64),
    JSON.map(lambda v: json.dumps(v).encode()),
    TASKISH.map(lambda v: json.dumps(v).encode()),
    TASKISH.map(lambda v: json.dumps(v).encode()[:-3]),  # cut short
)
POISON = st.lists(st.tuples(FOLDERS, PAYLOADS), min_size=1, max_size=8, unique_by=lambda p: p[0])

_names = itertools.count()


async def one_example(url: str, poison: list[tuple[str, bytes]]) -> None:
    name = f"p{next(_names)}"
    q = await qo.connect(url, queue=name)
    await q.schedules.add("tick", cron="* * * * *", task_type="t", input="tick")
    worker = Worker(q, concurrency=4, **FAST)
    worker.handler("t")(lambda input: input)
    run = asyncio.create_task(worker.run())
    errors: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info or record.levelno >= logging.ERROR:
                errors.append(record)

    catch = Catch()
    logging.getLogger("qo").addHandler(catch)
    try:
        good = []
        for i, (folder, data) in enumerate(poison):  # the producer and the poisoner interleave
            good.append(await q.submit("t", i))
            await q.storage.put(f"{name}/{folder}", data)
        good += await q.submit_many([("t", i) for i in range(3)])
        clock = FakeClock(q.clock.now() + 120)  # the scheduler's time: a fire is due
        sched_q = await qo.connect(url, queue=name, clock=clock)
        fired = await Scheduler(sched_q).run_once()
        await sched_q.close()
        assert fired and {f.name for f in fired} == {"tick"}  # the good schedule fired
        done = await asyncio.wait_for(asyncio.gather(*(q.wait(t.id, timeout=None) for t in good)), 30)
        assert [t.status for t in done] == ["completed"] * len(good)
        await asyncio.wait_for(q.wait(fired[0].task_id, timeout=None), 30)
    finally:
        worker.stop()
        await asyncio.wait_for(run, 30)
        logging.getLogger("qo").removeHandler(catch)
    assert not errors, [r.getMessage() for r in errors]  # nothing escaped a loop
    assert worker.stats["errors"] == 0
    found = {f.key async for f in scan(q)}
    for folder, data in poison:
        key = f"{name}/{folder}"
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if not isinstance(parsed, dict) and not folder.startswith("ready/"):
            assert key in found, (key, data)  # not even a JSON object: always named
    await q.close()


async def test_random_garbage_at_random_keys_costs_only_itself(storage_url, backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(POISON)
    def check(poison):
        asyncio.run(one_example(storage_url, poison))

    await asyncio.to_thread(check)
