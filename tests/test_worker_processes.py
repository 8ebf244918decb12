"""Workers as real processes: races, SIGKILL, graceful shutdown, lease renewal."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import signal


import qo
from qo import keys
from qo.worker import Worker

import procs

CTX = multiprocessing.get_context("spawn")


#: tasks per backend: moto serves the eight processes from one thread of the test process
RACE_TASKS = {"local": 500, "s3": 200, "azure": 200, "sqlite": 500}


async def test_eight_worker_processes_run_each_task_exactly_once(storage_url, backend, tmp_path):
    q = await qo.connect(storage_url, queue="race")
    n = RACE_TASKS[backend]
    tasks = await q.submit_many([("count", i) for i in range(n)], bulk=False)  # one object each: packs race in test_packs.py
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    loop = asyncio.get_running_loop()
    with CTX.Pool(8) as pool:
        results = [pool.apply_async(procs.run_counting_worker, (storage_url, "race", str(log_dir)))
                   for _ in range(8)]
        stats = await loop.run_in_executor(None, lambda: [r.get(timeout=240) for r in results])
    runs = collections.Counter()
    for f in log_dir.iterdir():
        runs.update(f.read_text().split())
    assert set(runs) == {t.id for t in tasks}
    assert max(runs.values()) == 1, [t for t, n in runs.items() if n > 1]
    statuses = collections.Counter([t.status async for t in q.list(limit=None)])
    assert statuses == {"completed": n}
    assert sum(s.get("completed", 0) for s in stats) == n
    assert sum(1 for s in stats if s.get("completed")) >= 2  # the work was really shared
    assert await q.storage.list(keys.ready_prefix("race")) == []
    await q.close()


async def test_sigkilled_worker_task_completes_elsewhere_after_lease(storage_url, tmp_path, fast_settings):
    q = await qo.connect(storage_url, queue="kill")
    task = await q.submit("sleepy", {"n": 1}, max_retries=3)
    started = tmp_path / "started"
    victim = CTX.Process(target=procs.run_sleepy_worker, args=(storage_url, "kill", str(started), 0.5))
    victim.start()
    try:
        pid, attempt = procs.wait_for_file(str(started)).split()
        assert int(pid) == victim.pid and attempt == "1"
        assert (await q.get(task.id)).status == "running"
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
    finally:
        if victim.is_alive():
            victim.kill()
    rescuer = Worker(q, settings=fast_settings)
    ran = []

    @rescuer.handler("sleepy")
    async def sleepy(input, ctx):
        ran.append(ctx.attempt)
        return "rescued"

    await asyncio.wait_for(rescuer.run(until_idle=True), 30)
    t = await q.get(task.id)
    assert t.status == "completed" and t.output == "rescued"
    assert ran == [2] and t.attempt == 2
    assert rescuer.stats["recovered"] == 1
    # the dead worker's record was removed by the recovery
    assert await q.storage.list(keys.workers_prefix("kill")) == []
    await q.close()


async def test_sigterm_finishes_running_tasks_and_exits(storage_url, tmp_path):
    q = await qo.connect(storage_url, queue="term")
    quick = await q.submit("job", 1)
    started = tmp_path / "started"
    proc = CTX.Process(target=procs.run_until_signal, args=(storage_url, "term", str(started), 0.1))
    proc.start()
    try:
        procs.wait_for_file(str(started))
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(20)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    assert (await q.get(quick.id)).status == "completed"
    assert "'completed': 1" in (tmp_path / "started.stats").read_text()
    assert await q.storage.list(keys.workers_prefix("term")) == []
    await q.close()


async def test_sigterm_hands_back_a_task_that_outlives_shutdown_timeout(storage_url, tmp_path, fast_settings):
    q = await qo.connect(storage_url, queue="handback")
    slow = await q.submit("job", 1, max_retries=0)
    started = tmp_path / "started"
    proc = CTX.Process(target=procs.run_until_signal, args=(storage_url, "handback", str(started), 3600))
    proc.start()
    try:
        procs.wait_for_file(str(started))
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(20)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    back = await q.get(slow.id)
    assert back.status == "pending" and back.attempt == 0  # the interrupted attempt is not counted
    assert "'handed_back': 1" in (tmp_path / "started.stats").read_text()
    worker = Worker(q, settings=fast_settings)
    worker.handler("job")(lambda input: "second try")
    await worker.run(until_idle=True)
    done = await q.get(slow.id)
    assert done.status == "completed" and done.attempt == 1  # max_retries=0 and yet it ran
    await q.close()
