"""A Flask app that submits a task per signup and shows its status.

    QO_URL=./.qo flask --app examples/flask_app.py run
    qo worker examples/tasks.py --queue emails
"""

import qo
from flask import Flask, abort, jsonify, request

from tasks import send_welcome_email

app = Flask(__name__)
queue = qo.connect_sync(queue="emails")  # one per process, shared by every request thread


@app.post("/signup")
def signup():
    email = (request.get_json(silent=True) or {}).get("email")
    if not email:
        abort(400, "email is required")
    task = send_welcome_email.submit_sync({"to": email}, idempotency_key=f"welcome:{email}")
    return jsonify(task_id=task.id), 202


@app.get("/tasks/<task_id>")
def task_status(task_id: str):
    try:
        task = queue.get(task_id)
    except (qo.TaskNotFound, qo.InvalidInput):
        abort(404)
    return jsonify(id=task.id, status=task.status, output=task.output)
