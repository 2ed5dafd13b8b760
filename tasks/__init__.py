"""Celery glue: the app, the ``tasks.generate_video`` task and the ``tasks.deliver_webhook``
task (never imports Flask).

``celery -A tasks worker -Q gpu -c 1 -E`` finds :data:`app` here (and ``-Q webhooks`` the
small worker that delivers webhooks).  Importing this package
does not import torch: the task imports the generation core when it first runs.
"""

from .app import make_celery

app = make_celery()
celery = app

from . import webhooks, worker  # noqa: E402,F401  (registers the tasks and the worker signals)
