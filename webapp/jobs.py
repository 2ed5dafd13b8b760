"""What both HTTP APIs do with a job, written once: ours (``/api``, :mod:`webapp.api`) and
the original FramePack API's routes (:mod:`webapp.original`), which translate their
shapes and words around these calls.

- :func:`service`: this web process's :class:`webapp.service.Service`;
- who sees which job (:func:`visible_snapshot`, :func:`visible_owner`): a caller sees its own
  jobs, an admin every job; another's job is "not found", so ids do not leak;
- a job's files (:func:`input_png`, :func:`final_video`, :func:`serve_file`): from Redis
  while the job is queued or running, from the results store after;
- a queue limit's refusal (:func:`queue_refusal`): the status and the Retry-After.
"""

from __future__ import annotations

from typing import Any

from flask import Response, current_app

from tasks.lifecycle import QueueFull
from tasks.protocol import INPUT_FILE, JobState

from . import files
from .auth import Principal, principal
from .service import Service

#: Retry-After (seconds) of a submit refused by a queue limit: about when a place may free up.
QUEUE_RETRY_AFTER = 30


def service() -> Service:
    return current_app.extensions["framepack"]


def visible_owner(who: Principal | None = None) -> str | None:
    """The owner whose jobs a listing shows the caller: its own, or None (all) for admins."""
    who = who or principal()
    return None if who.admin else who.name


def visible_snapshot(job_id: str) -> dict[str, Any] | None:
    """The job's snapshot, if it exists and the caller may see it (else None either way)."""
    view = service().snapshot(job_id)
    return view if view is not None and principal().may_see(view.get("owner")) else None


def input_png(job_id: str) -> bytes | None:
    """The job's input image (PNG): in Redis while it is queued or running, then in the store."""
    data = service().read_input(job_id)
    return data if data is not None else service().store.read_all(job_id, INPUT_FILE)


def final_video(view: dict[str, Any] | None) -> str | None:
    """A succeeded job's final video file name, if the results store has it."""
    if view is None or view["state"] != JobState.SUCCEEDED.value:
        return None
    name = ((service().record(view["id"]) or {}).get("result") or {}).get("video")
    return name if name and service().store.stat(view["id"], name) is not None else None


def serve_file(job_id: str, name: str, field: str, disposition: str | None = None) -> Response:
    """A result file with Range, from the results store (a 302 to the bucket when configured);
    ``disposition`` names it as a download (not on a redirect: the bucket names it)."""
    svc = service()
    seconds = svc.settings.presign_seconds if svc.settings.results_redirect else 0
    resp = files.serve(svc.store, job_id, name, field, redirect_seconds=seconds)
    if disposition and resp.status_code != 302:
        resp.headers["Content-Disposition"] = disposition
    return resp


def queue_refusal(exc: QueueFull) -> tuple[int, dict[str, str]]:
    """A queue limit: 429 when it is the caller's own, 503 when it is everyone's."""
    return (429 if exc.scope == "token" else 503), {"Retry-After": str(QUEUE_RETRY_AFTER)}
