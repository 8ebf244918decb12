"""The task functions the web examples submit, and a worker runs:

    qo worker examples/tasks.py --queue emails
"""

import qo


@qo.task("send_welcome_email", queue="emails", priority="high", max_retries=5)
def send_welcome_email(input: dict) -> dict:
    # a real app would call its mail provider here
    return {"sent_to": input["to"]}
