"""The original FramePack API (a FastAPI fork of FramePack), exactly as its clients use it.

Its own tests, its Swagger form and its React EventSource client rely on: a form-only
``POST /generate`` without bounds (what it accepts we accept: values outside our ranges
are clamped or rounded, and the reply says so under ``adjusted``), FastAPI's error shape
(``{"detail": "Job not found"}``; validation: ``{"detail": [{loc, msg, type}]}``), the
status words ``pending``, ``processing``, ``completed``, ``cancelled``, ``failed - <reason>``,
and the shapes below.  Our own API (``/api/...``) keeps its stricter validation; the
differences that remain are listed in ``docs/protocol.md`` ("The original API").

It is a translator over our own API, not a second one: its form becomes :class:`JobParams`
(the ranges it clamps into are the schema's own, :func:`diffusers_helper.params.bounds`),
our states become its words through one table (``ORIGINAL_STATUS`` in
:mod:`tasks.protocol`), and it calls the same submit, view, file and cancel functions as
``/api`` (:mod:`webapp.jobs`, :class:`webapp.service.Service`).  Errors raised in its
routes get FastAPI's ``detail`` beside our error body (its blueprint's handlers); its own
refusals (:class:`OriginalError`) are FastAPI's shape alone.  The event streams are fed by
the same hub as the WebSockets.  With API tokens (``webapp.auth``) these routes need
one like the rest (an ``EventSource``: ``?access=``); a caller sees only its own jobs
(another's is "Job not found"), ``/queue``, ``/videos`` and ``/cleanup_jobs`` included; its
role's limits on seconds and steps are ranges like the others (clamped, under ``adjusted``).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import TypeAdapter, ValidationError

from diffusers_helper import lora_files
from diffusers_helper.params import MAX_SEED, JobParams, LoraSpec, bounds, field_errors
from tasks.lifecycle import QueueFull
from tasks.protocol import ORIGINAL_STATUS, TERMINAL, JobState

from . import errors, sse, watch
from .api import parse_webhook
from .auth import principal
from .errors import ApiError
from .framing import KEEP_ALIVE_EVENT, sse_event
from .jobs import final_video, input_png, queue_refusal, serve_file, service, visible_owner, visible_snapshot
from .offload import off_loop
from .uploads import ImageError, normalise

bp = Blueprint("original", __name__)
# Errors raised in these routes (a Redis outage, a token refused...): our body plus FastAPI's key.
errors.register(bp, lambda exc: {**errors.error_body(exc), "detail": exc.message})


class OriginalError(Exception):
    """An error in FastAPI's shape: ``{"detail": ...}`` with the status FastAPI would use."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}


@bp.errorhandler(OriginalError)
def _original_error(exc: OriginalError) -> Response:
    resp = jsonify({"detail": exc.detail})
    resp.status_code = exc.status
    resp.headers.update(exc.headers)
    return resp


# -- POST /generate ------------------------------------------------------------------------
#: The fork's form: name -> (type, default).  Types are checked as FastAPI checks them
#: (pydantic, lax: "true"/"1"/"yes" are booleans); ranges are not checked, but clamped.
FORM: dict[str, tuple[Any, Any]] = {
    "prompt": (str, ""),
    "video_length": (float, 5.0),
    "seed": (int, -1),
    "use_teacache": (bool, True),
    "gpu_memory_preservation": (float, 6.0),
    "steps": (int, 25),
    "cfg": (float, 1.0),
    "gs": (float, 10.0),
    "rs": (float, 0.0),
    "mp4_crf": (float, 16.0),
    "lora_scale": (float, 1.0),
    "lora_path": (str, None),
    "sampling_mode": (str, "reverse"),
}
MODES = {"reverse": "framepack", "forward": "framepack-f1"}
#: The form's numbers -> our parameters; each is clamped into our schema's range.
OURS = {"video_length": "total_second_length", "steps": "steps", "cfg": "cfg", "gs": "gs", "rs": "rs",
        "gpu_memory_preservation": "gpu_memory_preservation", "mp4_crf": "mp4_crf"}  # fmt: skip
RANGES = {name: (ours, *bounds(JobParams, ours)) for name, ours in OURS.items()}
LORA_SCALE = bounds(LoraSpec, "weight")


def _form_values() -> dict[str, Any]:
    """The form, typed as FastAPI would type it; 422 in FastAPI's shape otherwise."""
    errors, values = [], {}
    if "image" not in request.files:
        errors.append({"type": "missing", "loc": ["body", "image"], "msg": "Field required", "input": None})
    for name, (kind, default) in FORM.items():
        raw = request.form.get(name)
        if raw is None:
            values[name] = default
            continue
        try:
            values[name] = TypeAdapter(kind).validate_python(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            errors.append({"type": err["type"], "loc": ["body", name], "msg": err["msg"], "input": raw})
    if values.get("sampling_mode") not in MODES and not any(e["loc"][1] == "sampling_mode" for e in errors):
        errors.append({"type": "enum", "loc": ["body", "sampling_mode"], "input": values.get("sampling_mode"),
                       "msg": "Input should be 'reverse' or 'forward'",
                       "ctx": {"expected": "'reverse' or 'forward'"}})  # fmt: skip
    if errors:
        raise OriginalError(422, errors)
    return values


def _to_params(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The form's values -> our parameters, clamped or rounded into our ranges; and what changed."""
    params: dict[str, Any] = {"prompt": values["prompt"], "use_teacache": values["use_teacache"],
                              "model": MODES[values["sampling_mode"]]}  # fmt: skip
    adjusted: dict[str, dict[str, Any]] = {}
    max_seconds, max_steps = service().settings.job_limits(principal().role)  # the caller's role's limits
    role = {"video_length": max_seconds, "steps": max_steps}
    for name, (ours, low, high) in RANGES.items():
        high = min(high, role.get(name, high))
        value = values[name]
        used = FORM[name][1] if value != value else min(max(value, low), high)  # NaN: the fork's default
        if name == "mp4_crf":
            used = int(round(used))
        if used != value:
            adjusted[name] = {"requested": _json_number(value), "used": used}
        params[ours] = used
    seed = values["seed"]
    params["seed"] = seed if 0 <= seed <= MAX_SEED else -1 if seed < 0 else seed % (MAX_SEED + 1)
    if seed < -1 or seed > MAX_SEED:
        adjusted["seed"] = {"requested": seed, "used": "random" if seed < 0 else params["seed"]}
    lora = (values["lora_path"] or "").strip()
    if lora:  # a file of our LoRA directory, named as the fork's clients name it: by path
        try:
            lora_files.check(service().settings.lora_dir, PurePath(lora).stem)
        except lora_files.LoraFileError as exc:
            raise OriginalError(422, [{"type": "value_error", "loc": ["body", "lora_path"], "msg": str(exc),
                                     "input": lora}]) from None  # fmt: skip
        low, high = LORA_SCALE
        scale = min(max(values["lora_scale"], low), high) if values["lora_scale"] == values["lora_scale"] else 1.0
        if scale != values["lora_scale"]:
            adjusted["lora_scale"] = {"requested": _json_number(values["lora_scale"]), "used": scale}
        params["loras"] = [{"name": PurePath(lora).stem, "weight": scale}]
    return params, adjusted


#: Our parameter names -> the original form's, for its error shapes.
FORM_NAMES = {ours: name for name, ours in OURS.items()} | {"loras": "lora_path"}


def _validated(params: dict[str, Any]) -> JobParams:
    """Our schema's checks the clamping cannot fix (a 5,000-character prompt, a timestamp
    after the end) as FastAPI's 422, naming the original form's field (was a 500)."""
    try:
        return JobParams.model_validate(params)
    except ValidationError as exc:
        errors = [{"type": "value_error", "loc": ["body", FORM_NAMES.get(e["field"].split(".")[0], e["field"])],
                   "msg": e["message"], "input": None} for e in field_errors(exc)]  # fmt: skip
        raise OriginalError(422, errors) from None


def _json_number(value: Any) -> Any:
    """NaN and infinity are not JSON: reported as their names."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _checked_form() -> tuple[JobParams, bytes, dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The form as our parameters, the normalised image, the webhook and what was clamped;
    a refusal (``OriginalError``) counts as ``refused{reason="invalid"}``."""
    try:
        params, adjusted = _to_params(_form_values())
        job_params = _validated(params)
        try:
            image = off_loop(normalise, "image", request.files["image"].read())
        except ImageError as exc:
            raise OriginalError(400, f"Failed to read or process uploaded image: {exc.message}") from None
        try:
            webhook = parse_webhook({k: request.form.get(k) for k in ("webhook", "webhook_events")
                                     if k in request.form})  # fmt: skip
        except ApiError as exc:
            raise OriginalError(exc.status, exc.message) from None
    except OriginalError:
        service().lifecycle.count_refusal("invalid")
        raise
    return job_params, image, webhook, adjusted


@bp.post("/generate")
def generate() -> Response:
    try:
        service().lifecycle.check_room(principal().owner)  # before the upload is decoded
        job_params, image, webhook, adjusted = _checked_form()
        job = service().submit(job_params, image, None, owner=principal().owner, webhook=webhook)
    except QueueFull as exc:
        status, headers = queue_refusal(exc)
        raise OriginalError(status, str(exc), headers) from None
    except OriginalError:
        raise
    except Exception as exc:  # noqa: BLE001 — the broker is down
        raise OriginalError(500, f"Failed to add job to queue: {exc}") from None
    body: dict[str, Any] = {"job_id": job["id"], "message": "Video generation job added to queue."}
    if adjusted:
        body["adjusted"] = adjusted
    return jsonify(body)


# -- reading jobs --------------------------------------------------------------------------
def original_word(view: dict[str, Any]) -> str:
    """Our state in the original API's words (``failed - <why>`` for a failure)."""
    state = JobState(view["state"])
    word = ORIGINAL_STATUS[state]
    if state is JobState.FAILED:
        return f"{word} - {view.get('error') or view.get('reason') or 'unknown error'}"
    return word


def original_status(view: dict[str, Any]) -> dict[str, Any]:
    """``/status`` fields: progress 0-100 over the job; step within the current section."""
    state = JobState(view["state"])
    steps = view.get("steps") or (view.get("params") or {}).get("steps")
    if state is JobState.QUEUED:
        info = ""
    elif state is JobState.SUCCEEDED:
        info = "Finished"
    elif state in TERMINAL:
        info = view.get("reason") or view.get("error") or ""
    else:
        info = view.get("message") or view.get("stage") or ""
    return {
        "job_id": view["id"],
        "status": original_word(view),
        "progress": 100.0 if state is JobState.SUCCEEDED else round(100.0 * float(view.get("progress") or 0), 1),
        "progress_step": steps if state is JobState.SUCCEEDED else (view.get("step") or 0),
        "progress_total": steps,
        "progress_info": info,
    }


@bp.get("/status/<job_id>")
def status(job_id: str) -> Response:
    view = visible_snapshot(job_id)
    if view is None:
        raise OriginalError(404, "Job not found")
    return jsonify(original_status(view))


@bp.get("/result/<job_id>")
def result(job_id: str) -> Response:
    view = visible_snapshot(job_id)
    if view is None:
        raise OriginalError(404, f"Job '{job_id}' not found or result file does not exist.")
    if view["state"] != JobState.SUCCEEDED.value:
        raise OriginalError(404, f"Job '{job_id}' is not completed yet (status: {original_word(view)}).")
    png = input_png(job_id)
    thumbnail = f"data:image/png;base64,{base64.b64encode(png).decode()}" if png else None
    return jsonify({"video_url": url_for("original.download_video", job_id=job_id, _external=True),
                    "thumbnail_base64": thumbnail})  # fmt: skip


@bp.get("/download/video/<job_id>")
def download_video(job_id: str) -> Response:
    view = visible_snapshot(job_id)
    name = final_video(view)
    if name is None:
        if view is None:
            raise OriginalError(404, f"Video file for job '{job_id}' not found.")
        raise OriginalError(404, f"Video file for job '{job_id}' not found, status is '{original_word(view)}'.")
    return serve_file(job_id, name, "video", f'attachment; filename="{job_id}.mp4"')  # as Starlette writes it


@bp.get("/input_image/<job_id>")
def input_image(job_id: str) -> Response:
    png = input_png(job_id) if visible_snapshot(job_id) else None
    if png is None:
        raise OriginalError(404, f"Job '{job_id}' not found and input image file does not exist.")
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, format="JPEG", quality=95)
    return Response(out.getvalue(), mimetype="image/jpeg",
                    headers={"Content-Disposition": f'inline; filename="input_{job_id}.jpg"'})  # fmt: skip


@bp.post("/cancel/<job_id>")
def cancel(job_id: str) -> Response:
    view = visible_snapshot(job_id)
    if view is None:
        raise OriginalError(404, "Job not found")
    if JobState(view["state"]) in TERMINAL:
        return jsonify({"message": f"Job is already {original_word(view).split(' - ')[0]}."})
    service().cancel(job_id)
    return jsonify({"message": f"Cancellation requested for job {job_id}."})


#: /queue lists the most recent jobs, running and recently finished ones included.
QUEUE_LISTED = 100


@bp.get("/queue")
def queue() -> Response:
    jobs, _ = service().list_page(0, QUEUE_LISTED, visible_owner())
    rows = []
    for summary in reversed(jobs):  # oldest first, as the fork's queue file
        view = visible_snapshot(summary["id"])
        if view is None:
            continue
        st = original_status(view)
        rows.append({"job_id": view["id"], "status": st["status"], "prompt": (view["params"] or {})
                     .get("prompt", "")[:50], "video_length": (view["params"] or {}).get("total_second_length"),
                     "progress": st["progress"], "progress_info": st["progress_info"]})  # fmt: skip
    return jsonify({"queue": rows})


@bp.get("/worker/status")
def worker_status() -> Response:
    workers = service().workers()
    running = service().running_ids(visible_owner())
    return jsonify({"is_running": any(w.get("ready") for w in workers),
                    "processing_job_id": running[0] if running else None})  # fmt: skip


@bp.get("/loras")
def loras() -> Response:
    return jsonify({"loras": [e["file"] for e in lora_files.list_loras(service().settings.lora_dir)]})


@bp.post("/cleanup_jobs")
def cleanup_jobs() -> Response:
    """Forget finished jobs beyond the newest ``FRAMEPACK_MAX_COMPLETED_JOBS`` (the fork's rule)."""
    removed = service().cleanup_finished(service().settings.max_completed_jobs, visible_owner())
    return jsonify({"message": f"Cleanup process completed. Removed {removed} old job entries."})


# -- videos ------------------------------------------------------------------------------------
@bp.get("/videos")
def videos() -> Response:
    # a succeeded job's video was stored before its end was written, and goes with its record
    return jsonify(sorted(f"{job_id}.mp4" for job_id in service().succeeded_ids(visible_owner())))


@bp.get("/videos/<path:filename>")
def video_file(filename: str) -> Response:
    if ".." in filename or filename.startswith("/") or "/" in filename:
        raise OriginalError(400, "Invalid filename.")
    if not filename.lower().endswith(".mp4"):
        raise OriginalError(400, "Invalid file type, only MP4 is supported.")
    view = visible_snapshot(filename[: -len(".mp4")])
    name = final_video(view)
    if view is None or name is None:
        raise OriginalError(404, "Video file not found")
    return serve_file(view["id"], name, "video", f'inline; filename="{filename}"')


def _admit() -> Callable[[], None]:
    """A watcher slot for an event stream, or FastAPI's shape of a 503 at capacity."""
    return sse.admit(service().hub, lambda message, headers: OriginalError(503, message, headers))


@bp.get("/video_stream")
def video_stream() -> Response:
    """The name of every video that appears (``data: <job_id>.mp4``), as the fork's watcher sends."""
    hub, who = service().hub, principal()

    def succeeded(item: Any) -> bool:
        data = item.data
        return data.get("event") == "finished" and data.get("state") == JobState.SUCCEEDED.value and who.may_see(
            data.get("owner"))  # fmt: skip

    def events() -> Iterator[str]:
        with watch.subscribed(hub, accept=succeeded) as outbox:
            for item in watch.updates(outbox):
                yield KEEP_ALIVE_EVENT if item is None else sse_event(None, f"{item.data['job_id']}.mp4")

    return sse.stream(events(), _admit())


@bp.get("/stream/status/<job_id>")
def stream(job_id: str) -> Response:
    """``event: progress`` with the status fields (and the preview) on every change; at the
    end one ``progress`` with the terminal status, then ``event: status`` and the end."""
    svc = service()

    def events() -> Iterator[str]:
        if visible_snapshot(job_id) is None:
            yield sse_event("status", {"status": "error", "message": "Job not found or cleaned up."})
            return
        with watch.subscribed(svc.hub, job_id) as outbox:
            view = svc.snapshot(job_id)
            pending = watch.updates(outbox, view["seq"])
            last_body = None
            while True:
                body = original_status(view)
                if view.get("preview") and view["state"] == JobState.RUNNING.value:
                    body["preview_image_base64"] = view["preview"]["image"]
                if body != last_body:
                    yield sse_event("progress", body)
                    last_body = body
                if JobState(view["state"]) in TERMINAL:
                    yield sse_event("status", {"status": body["status"], "message": "Job finished."})
                    return
                item = None
                for item in pending:  # keep-alives until the next update
                    if item is not None:
                        break
                    yield KEEP_ALIVE_EVENT
                if item is None:
                    return  # overflow: a client this far behind reconnects and starts from a fresh status
                view = {**view, **item.data, "id": job_id}
                if JobState(view["state"]) in TERMINAL:
                    view = svc.snapshot(job_id) or view  # the record has the reason and the result

    return sse.stream(events(), _admit())
