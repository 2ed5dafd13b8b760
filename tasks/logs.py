"""Log lines as log pipelines want them: ``LOG_FORMAT=json`` (torch- and Flask-free).

One JSON object per line (``time``, ``level``, ``logger``, ``message``, ``process``,
``exc_info`` when there is one) and ``job_id`` on every line about a job, found in this
order:

1. ``extra={"job_id": ...}`` on the call;
2. :func:`job_context`: the worker's task, its writer and upload threads, the lifecycle
   and the sweep set it while they work on one job, and the web tier per request for
   routes with a ``job_id``;
3. Celery's own lines about a task ("Task ... received", "... succeeded in"), which carry
   the task id (= our job id) in their arguments;
4. gunicorn's access lines (on in JSON mode), from the request path of a job's route.

Text format (the default) leaves logging as Celery and gunicorn set it up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

#: The job the current thread (or request) works on.
CURRENT_JOB: ContextVar[str | None] = ContextVar("framepack_job_id", default=None)

#: A job's routes (REST, WebSocket, the original API): the id is the segment after these.
JOB_PATH = re.compile(r"^/(?:api/jobs|ws/jobs|status|stream/status|result|download/video|cancel)/([A-Za-z0-9_-]+)")

#: Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


@contextlib.contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    token = CURRENT_JOB.set(job_id)
    try:
        yield
    finally:
        CURRENT_JOB.reset(token)


def job_id_of(record: logging.LogRecord) -> str | None:
    job_id = getattr(record, "job_id", None) or CURRENT_JOB.get()
    if job_id is None and isinstance(record.args, Mapping):
        job_id = record.args.get("id")  # Celery's task lines: {"id": ..., "name": ...}
        path = record.args.get("U")  # gunicorn's access lines: "U" is the path
        if job_id is None and isinstance(path, str) and (match := JOB_PATH.match(path)):
            job_id = match.group(1)
    return job_id if isinstance(job_id, str) else None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message.strip(),
            "process": record.process,
        }
        job_id = job_id_of(record)
        if job_id:
            body["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in body and key != "data":  # ``data``: Celery's copy of args
                body[key] = value
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exc_info"] = record.exc_text
        return json.dumps(body, default=str, ensure_ascii=False)


def use_json(loggers: list[logging.Logger] | None = None) -> None:
    """Give every handler of ``loggers`` (root by default) the JSON formatter; a logger
    without handlers gets one on stderr."""
    for logger in loggers or [logging.getLogger()]:
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler(sys.stderr))
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())


def configure(log_format: str, level: str = "INFO") -> None:
    """For processes whose logging nobody else sets up (the web tier): JSON on stderr at
    ``level``.  The text format changes nothing (warnings and errors reach stderr)."""
    if log_format == "json":
        root = logging.getLogger()
        use_json([root])
        root.setLevel(level)
