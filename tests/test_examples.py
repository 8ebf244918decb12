"""The README's web examples (examples/): Flask, Django and FastAPI producers submit a
task per request through qo's sync or async API; a worker runs it; the status endpoint
shows the outcome. The frameworks are test dependencies only."""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path

import pytest

import qo
import qo.sync
from qo.handlers import default_registry

from conftest import FAST

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example(storage_url, monkeypatch):
    """Import an example app (fresh) with QO_URL pointing at the store under test."""
    monkeypatch.setenv("QO_URL", storage_url)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    loaded = []

    def load(name: str):
        module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
        loaded.append(module)
        return module

    yield load
    for module in loaded:
        q = getattr(module, "queue", None)
        if isinstance(q, qo.SyncQueue):
            q.close()
    qo.sync.close_shared()
    default_registry.handlers.pop("send_welcome_email", None)
    sys.modules.pop("tasks", None)


def drain(url: str) -> None:
    """Run a worker on the emails queue with the examples' handlers until idle."""
    async def run() -> None:
        q = await qo.connect(url, queue="emails")
        try:
            w = qo.Worker(q, **FAST)
            w.add_handlers(qo.handlers.import_handlers([]))
            await w.run(until_idle=True)
        finally:
            await q.close()

    asyncio.run(run())


def check_stored(url: str, task_id: str, status: str) -> qo.Task:
    with qo.connect_sync(url, queue="emails") as q:
        task = q.get(task_id)
    assert (task.task_type, task.status, task.priority, task.max_retries) == ("send_welcome_email", status, 192, 5)
    return task


def test_flask_example(example, storage_url):
    app = example("flask_app").app
    client = app.test_client()
    assert client.post("/signup", json={}).status_code == 400
    r = client.post("/signup", json={"email": "a@example.com"})
    assert r.status_code == 202
    task_id = r.get_json()["task_id"]
    again = client.post("/signup", json={"email": "a@example.com"})  # idempotent: the same task
    assert again.get_json()["task_id"] == task_id
    check_stored(storage_url, task_id, "pending")
    assert client.get(f"/tasks/{task_id}").get_json()["status"] == "pending"
    drain(storage_url)
    assert client.get(f"/tasks/{task_id}").get_json() == {
        "id": task_id, "status": "completed", "output": {"sent_to": "a@example.com"}}
    assert client.get("/tasks/nope").status_code == 404


def test_django_example(example, storage_url):
    module = example("django_app")
    from django.test import Client
    from django.urls import clear_url_caches

    clear_url_caches()
    client = Client()
    assert client.post("/signup", data=b"{}", content_type="application/json").status_code == 400
    r = client.post("/signup", data=b'{"email": "b@example.com"}', content_type="application/json")
    assert r.status_code == 202, r.content
    task_id = r.json()["task_id"]
    check_stored(storage_url, task_id, "pending")
    drain(storage_url)
    assert client.get(f"/tasks/{task_id}").json()["output"] == {"sent_to": "b@example.com"}
    assert client.get("/tasks/nope").status_code == 404
    assert module.queue.name == "emails"


def test_fastapi_example(example, storage_url):
    from fastapi.testclient import TestClient

    app = example("fastapi_app").app
    with TestClient(app) as client:  # runs the lifespan: the app's own async Queue
        assert client.post("/signup", json={}).status_code == 422
        r = client.post("/signup", json={"email": "c@example.com"})
        assert r.status_code == 202
        task_id = r.json()["task_id"]
        check_stored(storage_url, task_id, "pending")
        drain(storage_url)
        assert client.get(f"/tasks/{task_id}").json() == {
            "id": task_id, "status": "completed", "output": {"sent_to": "c@example.com"}}
        assert client.get("/tasks/nope").status_code == 404
