"""A FastAPI app: async endpoints use the async API (``await``), never the sync one.

    QO_URL=./.qo uvicorn --app-dir examples fastapi_app:app
    qo worker examples/tasks.py --queue emails
"""

from contextlib import asynccontextmanager

import qo
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from tasks import send_welcome_email


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.queue = await qo.connect(queue="emails")  # on the server's event loop
    yield
    await app.state.queue.close()


app = FastAPI(lifespan=lifespan)


class Signup(BaseModel):
    email: str


@app.post("/signup", status_code=202)
async def signup(body: Signup) -> dict:
    task = await send_welcome_email.submit({"to": body.email}, using=app.state.queue,
                                           idempotency_key=f"welcome:{body.email}")
    return {"task_id": task.id}


@app.get("/tasks/{task_id}")
async def task_status(task_id: str) -> dict:
    try:
        task = await app.state.queue.get(task_id)
    except (qo.TaskNotFound, qo.InvalidInput):
        raise HTTPException(404) from None
    return {"id": task.id, "status": task.status, "output": task.output}
