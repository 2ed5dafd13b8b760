"""Celery glue: the app and the ``tasks.generate_video`` task (never imports Flask).

``celery -A tasks worker -Q gpu -c 1 -E`` finds :data:`app` here.  Importing this package
does not import torch: the task imports the generation core when it first runs.
"""

from .app import make_celery

app = make_celery()
celery = app

from . import worker  # noqa: E402,F401  (registers the task and the worker signals)
