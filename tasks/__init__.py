"""Celery glue (never imports Flask): the Celery app, the ``tasks.generate_video`` task
(:mod:`tasks.job`), the worker process (:mod:`tasks.worker`) and the ``tasks.deliver_webhook``
task (:mod:`tasks.webhooks`).

``celery -A tasks worker -Q gpu -c 1 -E`` looks up :data:`app` here (and ``-Q webhooks`` the
small worker that delivers webhooks).  The app is built on that first lookup, and the task
modules (with the worker's signal handlers) are imported with it: importing ``tasks`` or any
of its modules, as the web tier does, creates no app, reads no environment and imports
neither torch nor the worker.
"""

from __future__ import annotations

from typing import Any

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name in ("app", "celery"):  # the two names `celery -A tasks` tries
        if _app is None:
            from .celery_app import make_celery

            _app = make_celery()
            from . import job, webhooks, worker  # noqa: F401  (registers the tasks and the worker's signals)
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
