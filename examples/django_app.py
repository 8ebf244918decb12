"""A one-file Django project that submits a task per signup and shows its status.

    QO_URL=./.qo python examples/django_app.py runserver
    qo worker examples/tasks.py --queue emails

In a real project the settings live in settings.py, the views in views.py, and the
SyncQueue in a module every view imports (it is thread-safe: one per process).
"""

import json
import sys

import django
from django.conf import settings

if not settings.configured:
    settings.configure(DEBUG=False, ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="example-only",
                       MIDDLEWARE=[])
    django.setup()

import qo  # noqa: E402
from django.http import Http404, HttpResponseBadRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402

from tasks import send_welcome_email  # noqa: E402

queue = qo.connect_sync(queue="emails")


@csrf_exempt  # an API endpoint; a form view keeps Django's CSRF protection
@require_POST
def signup(request):
    email = json.loads(request.body or b"{}").get("email")
    if not email:
        return HttpResponseBadRequest("email is required")
    task = send_welcome_email.submit_sync({"to": email}, idempotency_key=f"welcome:{email}")
    return JsonResponse({"task_id": task.id}, status=202)


@require_GET
def task_status(request, task_id):
    try:
        task = queue.get(task_id)
    except (qo.TaskNotFound, qo.InvalidInput):
        raise Http404 from None
    return JsonResponse({"id": task.id, "status": task.status, "output": task.output})


urlpatterns = [path("signup", signup), path("tasks/<str:task_id>", task_status)]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
