"""The Celery applications: the worker's, and the web tier's dispatch-only client.

The client has no result backend on purpose: Celery's Redis backend subscribes the
*dispatching* process to every task's result channel and never lets go (celery #6963).
The web tier reads results itself, with one subscriber per process (``webapp.hub``).
"""

from __future__ import annotations

from celery import Celery


def make_celery(client: bool = False) -> Celery:
    app = Celery("framepack")
    app.config_from_object("celeryconfig")
    if client:
        app.conf.result_backend = None
        app.conf.task_ignore_result = False
    return app
