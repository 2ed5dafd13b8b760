"""The Celery applications: the worker's, and the web tier's dispatch-only client.

Both take their configuration from ``celeryconfig`` (a plain Celery config module, what
``celery inspect conf`` and Flower show); a :class:`tasks.settings.Settings` passed in
decides the broker and the result backend, so a web tier created with settings of its
own (tests, tools) dispatches to the broker those name, not the environment's.

The client has no result backend on purpose: Celery's Redis backend subscribes the
*dispatching* process to every task's result channel and never lets go (celery #6963).
The web tier reads results itself, with one subscriber per process (``webapp.hub``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery

if TYPE_CHECKING:
    from .settings import Settings


def make_celery(settings: Settings | None = None, client: bool = False) -> Celery:
    app = Celery("framepack")
    app.config_from_object("celeryconfig")
    if settings is not None:
        app.conf.broker_url = settings.broker_url
        app.conf.result_backend = settings.result_backend
    if client:
        app.conf.result_backend = None
        app.conf.task_ignore_result = False
    return app
