"""gunicorn settings for the web tier: ``gunicorn -c python:gunicorn_conf 'webapp:create_app()'``.

- **Metrics under several processes**: prometheus-client's multiprocess mode needs
  ``PROMETHEUS_MULTIPROC_DIR`` set before any process imports it, empty at start, and dead
  workers' live gauges dropped.  This module runs in the gunicorn master before it forks:
  it uses the directory given (wiping what a previous run left) or makes a private one,
  and :func:`child_exit` marks each exited worker dead.
- **File descriptors**: each watcher holds a socket; the soft limit is raised to the hard
  one (often 1,024 soft by default), so capacity is ours to set (``FRAMEPACK_WATCHER_CAPACITY``).
- **Garbage collection**: see :func:`post_worker_init`.
- **Logs**: with ``LOG_FORMAT=json`` gunicorn's own lines (start-up, worker boots, the
  access log when enabled) are JSON too, like the application's (``tasks/logs.py``).

Everything else (bind, workers, threads) stays on the command line.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.settings import Settings

_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_made = not _dir
if _dir:
    _path = Path(_dir)
    if _path.is_dir():
        for _stale in _path.glob("*.db"):  # a previous run's counters are not this run's
            _stale.unlink(missing_ok=True)
    _path.mkdir(parents=True, exist_ok=True)
else:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _dir = tempfile.mkdtemp(prefix="framepack-prometheus-")


_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard != resource.RLIM_INFINITY and _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _made:  # only the directory made here
        shutil.rmtree(_dir, ignore_errors=True)


_settings = Settings.from_env()  # LOG_FORMAT and LOG_LEVEL, parsed where everything else is
if _settings.log_format == "json":
    # Python warnings (gevent's monkey-patching notes among them) become log records too, so
    # that every line is one JSON object.
    import logging

    logging.captureWarnings(True)
    _handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "tasks.logs.JsonFormatter"}},
        "handlers": {"console": _handler, "error_console": _handler},
        "root": {"level": _settings.log_level, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
    }


def post_worker_init(worker: Any) -> None:
    """The web process's full garbage collections wait for gaps between fan-outs
    (:mod:`webapp.gcpolicy`)."""
    from webapp import gcpolicy

    gcpolicy.take_over()
