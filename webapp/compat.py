"""The original FramePack API's routes, for its existing clients.

Same field names (``video_length`` for seconds, ``sampling_mode`` reverse|forward, seed
−1 = random), same status words (``pending``, ``processing``, ``completed``, ``failed``,
``cancelled``), progress 0–100.  ``/stream/status/<id>`` is Server-Sent Events fed by the
same hub as the WebSocket, and it finally carries the preview the original never sent.
With API tokens, these routes need one like the rest (``EventSource``: ``?access=``), and
each caller sees only its own jobs, ``/queue`` included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context
from pydantic import ValidationError
from werkzeug.datastructures import MultiDict

from tasks.protocol import LEGACY_STATUS, TERMINAL, JobState

from .api import WEBHOOK_FIELDS, cancel_job, job_video, service, submit_from_request, view_or_404, visible_owner
from .errors import ApiError, from_image, from_validation
from .uploads import ImageError

bp = Blueprint("compat", __name__)

#: legacy field -> schema field
RENAMES = {"video_length": "total_second_length", "sampling_mode": "model"}
MODES = {"reverse": "framepack", "forward": "framepack-f1"}
BACK = {v: k for k, v in RENAMES.items()}


def _translate_form() -> None:
    """The legacy names onto the schema's; fields the schema does not know are ignored, as
    the original (FastAPI) server ignores them."""
    from diffusers_helper.params import JobParams

    known = set(JobParams.model_fields) | set(WEBHOOK_FIELDS)
    form = MultiDict()
    for key, value in request.form.items(multi=True):
        if key == "sampling_mode":
            value = MODES.get(value, value)
        name = RENAMES.get(key, key)
        if name in known:
            form.add(name, value)
    request.form = form  # type: ignore[misc]


def legacy_status(view: dict[str, Any]) -> dict[str, Any]:
    steps, step = view.get("steps"), view.get("step")
    sections, section = view.get("sections"), view.get("section")
    total = steps * sections if steps and sections else None
    done = (section - 1) * steps + step if total and section and step else 0
    return {
        "job_id": view["id"],
        "status": view["status"],
        "progress": round(100.0 * float(view.get("progress") or 0), 1),
        "progress_step": done if view["state"] != JobState.SUCCEEDED.value else total,
        "progress_total": total,
        "progress_info": view.get("reason") or view.get("error") or view.get("message") or view.get("stage")
        or view["status"],
    }


@bp.post("/generate")
def generate() -> Response:
    if request.mimetype != "application/json":
        _translate_form()
    try:
        view = submit_from_request()
    except ValidationError as exc:
        raise from_validation(exc, BACK) from None
    except ImageError as exc:
        raise from_image(exc, BACK) from None
    except ApiError as exc:
        raise exc.renamed(BACK) from None
    return jsonify({"job_id": view["id"], "message": "Job submitted", "status": view["status"]})


@bp.get("/status/<job_id>")
def status(job_id: str) -> Response:
    return jsonify(legacy_status(view_or_404(job_id)))


@bp.get("/result/<job_id>")
def result(job_id: str) -> Response:
    view = view_or_404(job_id)
    body = {**legacy_status(view), "result": view.get("result"), "error": view.get("error")}
    if view["state"] == JobState.SUCCEEDED.value:
        body["video_url"] = f"/download/video/{job_id}"
    return jsonify(body)


@bp.get("/download/video/<job_id>")
def download(job_id: str) -> Response:
    return job_video(job_id)


@bp.post("/cancel/<job_id>")
def cancel(job_id: str) -> Response:
    return cancel_job(job_id)


@bp.get("/queue")
def queue() -> Response:
    svc = service()
    owner = visible_owner()
    queued = [{"job_id": i, "position": n, "status": LEGACY_STATUS[JobState.QUEUED]}
              for i, n in svc.queued(owner)]  # fmt: skip
    running = svc.running_ids(owner)
    return jsonify({"queue": queued, "queue_length": len(queued), "processing": running})


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@bp.get("/stream/status/<job_id>")
def stream(job_id: str) -> Response:
    svc = service()
    view_or_404(job_id)

    def events() -> Iterator[str]:
        outbox = svc.hub.new_outbox()
        svc.hub.watch_job(job_id, outbox)
        try:
            view = svc.view(job_id)
            last = view["seq"]
            while JobState(view["state"]) not in TERMINAL:
                body = legacy_status(view)
                if view.get("preview") and view["state"] == JobState.RUNNING.value:
                    body["preview_image_base64"] = view["preview"]["image"]
                yield _sse("progress", body)
                item = None
                while item is None or item.seq <= last:  # skip what this stream already showed
                    if outbox.overflowed:
                        return  # a client this far behind reconnects and starts from a snapshot
                    item = outbox.get(timeout=15.0)
                    if item is None:
                        yield ": keep-alive\n\n"
                last = item.seq
                view = {**view, **item.data, "id": job_id}
                view["status"] = LEGACY_STATUS[JobState(view["state"])]
            yield _sse("status", {**legacy_status(svc.view(job_id)), "result": view.get("result")})
        finally:
            svc.hub.unwatch_job(job_id, outbox)

    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
