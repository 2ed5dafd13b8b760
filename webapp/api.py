"""REST API: ``/api/jobs`` and friends.  Views only translate HTTP to :class:`Service` calls;
errors are raised as :class:`webapp.errors.ApiError` and rendered by one handler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file
from pydantic import ValidationError

from diffusers_helper import lora_files
from diffusers_helper.params import ExtendParams, JobParams
from tasks.protocol import INPUT_FILE, TERMINAL, JobState

from .errors import ApiError, from_image, from_validation, not_found
from .service import Service
from .uploads import ImageError, decode_base64, normalise

bp = Blueprint("api", __name__)

#: Paging bounds of GET /api/jobs.
MAX_LIMIT = 200
MAX_OFFSET = 2**31 - 1


def service() -> Service:
    return current_app.extensions["framepack"]


def parse_submission(fields: dict[str, Any], files: dict[str, bytes],
                     lora_dir: Path | None = None) -> tuple[JobParams, bytes, bytes | None]:  # fmt: skip
    """Form/JSON fields + image bytes -> validated params and normalised images.

    Raises :class:`ImageError`, pydantic's ``ValidationError`` or :class:`ApiError` (a LoRA
    the directory does not have); nothing is stored.
    """
    if "image" not in files:
        raise ImageError("image", "an input image is required", status=400)
    fields = {k: v for k, v in fields.items() if v not in ("", None) or k in ("prompt", "n_prompt")}
    fields.pop("image", None)
    has_end = "end_image" in files
    fields.pop("end_image", None)
    if has_end:
        fields["end_image"] = "upload"
    params = JobParams.model_validate(fields)  # field errors before image work
    for i, spec in enumerate(params.loras):
        try:
            lora_files.resolve(lora_dir, spec.name)
        except lora_files.LoraFileError as exc:
            raise ApiError(422, f"loras.{i}.name: {exc}", f"loras.{i}.name") from None
    image = normalise("image", files["image"])
    end = normalise("end_image", files["end_image"]) if has_end else None
    return params, image, end


def form_loras(values: list[str]) -> list[dict[str, Any]]:
    """Form fields ``loras=NAME[:WEIGHT]`` (repeated) -> ``[{"name", "weight"}]``."""
    out = []
    for i, value in enumerate(values):
        name, _, weight = value.partition(":")
        try:
            out.append({"name": name, "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise ApiError(422, f"loras.{i}.weight: {weight!r} is not a number", f"loras.{i}.weight") from None
    return out


def read_request() -> tuple[dict[str, Any], dict[str, bytes]]:
    if request.mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ImageError("body", "the JSON body must be an object", status=400)
        files = {}
        for name in ("image", "end_image"):
            value = body.get(name)
            if value in (None, ""):
                continue
            if not isinstance(value, str):
                raise ImageError(name, "must be a base64 string or a data URL")
            files[name] = decode_base64(name, value)
        return body, files
    fields: dict[str, Any] = request.form.to_dict()
    if "loras" in request.form:
        fields["loras"] = form_loras(request.form.getlist("loras"))
    files = {name: f.read() for name, f in request.files.items() if name in ("image", "end_image")}
    return fields, files


def submit_from_request() -> dict[str, Any]:
    """Shared by ``POST /api/jobs`` and the legacy ``POST /generate``."""
    fields, files = read_request()
    params, image, end = parse_submission(fields, files, service().settings.lora_dir)
    try:
        return service().submit(params, image, end)
    except Exception as exc:  # noqa: BLE001 — the broker is down: say so, store nothing
        current_app.logger.exception("dispatch failed")
        raise ApiError(503, f"could not queue the job: {exc}", headers={"Retry-After": "5"}) from None


@bp.post("/api/jobs")
def create_job() -> Response:
    view = submit_from_request()
    resp = jsonify(view)
    resp.status_code = 202
    resp.headers["Location"] = view["links"]["self"]
    return resp


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: must be an integer", name) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: must be between {low} and {high}", name)
    return value


@bp.get("/api/jobs")
def list_jobs() -> Response:
    limit = _int_arg("limit", 20, 1, MAX_LIMIT)
    offset = _int_arg("offset", 0, 0, MAX_OFFSET)
    jobs, total = service().list_page(offset, limit)
    nxt = f"/api/jobs?offset={offset + limit}&limit={limit}" if offset + limit < total else None
    return jsonify({"jobs": jobs, "total": total, "offset": offset, "limit": limit, "next": nxt})


def view_or_404(job_id: str) -> dict[str, Any]:
    view = service().view(job_id)
    if view is None:
        raise not_found()
    return view


@bp.get("/api/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    return jsonify(view_or_404(job_id))


@bp.post("/api/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    view = view_or_404(job_id)
    if JobState(view["state"]) in TERMINAL:
        raise ApiError(409, f"state: the job already {view['state']}", "state")
    resp = jsonify(service().cancel(job_id))
    resp.status_code = 202
    return resp


@bp.post("/api/jobs/<job_id>/extend")
def extend_job(job_id: str) -> Response:
    """Continue a succeeded job's video forward (F1, from its last section checkpoint)."""
    view = view_or_404(job_id)
    body = request.get_json(silent=True) if request.mimetype == "application/json" else request.form.to_dict()
    if not isinstance(body, dict):
        raise ApiError(400, "body: a JSON object (or a form) with seconds", "body")
    ext = ExtendParams.model_validate(body)
    if view["state"] != JobState.SUCCEEDED.value:
        raise ApiError(409, f"state: only a succeeded job can be extended; this one is {view['state']}", "state")
    if not service().checkpoint_path(job_id).is_file():
        raise ApiError(409, "state: this job has no section checkpoint to continue from (made before checkpoints, "
                            "or its files expired)", "state")  # fmt: skip
    new = service().extend(job_id, view, ext)
    resp = jsonify(new)
    resp.status_code = 202
    resp.headers["Location"] = new["links"]["self"]
    return resp


@bp.delete("/api/jobs/<job_id>")
def delete_job(job_id: str) -> Response:
    view = view_or_404(job_id)
    if JobState(view["state"]) not in TERMINAL:
        raise ApiError(409, "state: only finished jobs can be deleted; cancel it first", "state")
    service().delete(job_id)
    return Response(status=204)


def _mp4(job_id: str, name: str | None) -> Response:
    path = service().job_dir(job_id) / name if name else None
    if path is None or not path.is_file():
        raise ApiError(404, "video: no such video (yet)", "video")
    return send_file(path, mimetype="video/mp4", conditional=True, max_age=0)


@bp.get("/api/jobs/<job_id>/video")
def job_video(job_id: str) -> Response:
    view = view_or_404(job_id)
    if view["state"] != JobState.SUCCEEDED.value:
        raise ApiError(409, f"state: no final video, the job is {view['state']}", "state")
    record = service().record(job_id) or {}
    return _mp4(job_id, (record.get("result") or {}).get("video"))


@bp.get("/api/jobs/<job_id>/sections/<int:k>")
def job_section(job_id: str, k: int) -> Response:
    view = view_or_404(job_id)
    latest = service().latest_meta(job_id)
    done = latest[1].get("sections_done", []) if latest else []
    name = next((s["file"] for s in done if s.get("section") == k), None)
    if name is None and JobState(view["state"]) not in TERMINAL and k >= 1 and k <= (view["sections"] or k):
        raise ApiError(409, f"state: section {k} is not written yet, the job is {view['state']}", "state")
    return _mp4(job_id, name)


@bp.get("/api/jobs/<job_id>/input")
def job_input(job_id: str) -> Response:
    view_or_404(job_id)
    data = service().read_input(job_id)
    if data is not None:
        return Response(data, mimetype="image/png")
    path = service().job_dir(job_id) / INPUT_FILE
    if not path.is_file():
        raise ApiError(404, "input: no longer available", "input")
    return send_file(path, mimetype="image/png")


#: Entries a batch may hold.
MAX_BATCH = 100


def _batch_entries() -> tuple[list[tuple[dict[str, Any], dict[str, bytes]]], int]:
    """``(fields, files)`` per entry: multipart ``images`` (repeated) with the shared fields,
    or JSON ``{"defaults": {...}, "jobs": [{"image": ..., overrides}]}``."""
    if request.mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
            raise ApiError(400, "jobs: the JSON body must be an object with a list of jobs", "jobs")
        defaults = body.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise ApiError(422, "defaults: must be an object", "defaults")
        extra = set(body) - {"defaults", "jobs"}
        if extra:
            raise ApiError(422, f"{sorted(extra)[0]}: unknown field (defaults, jobs)", sorted(extra)[0])
        entries = []
        for item in body["jobs"]:
            fields = {**defaults, **item} if isinstance(item, dict) else {"image": item}
            files = {}
            for name in ("image", "end_image"):
                value = fields.pop(name, None)
                if isinstance(value, str) and value:
                    try:
                        files[name] = decode_base64(name, value)
                    except ImageError:
                        files[name] = b""  # refused with its entry below
                elif value not in (None, ""):
                    files[name] = b""
            entries.append((fields, files))
        return entries, len(body["jobs"])
    images = request.files.getlist("images")
    shared: dict[str, Any] = request.form.to_dict()
    if "loras" in request.form:
        shared["loras"] = form_loras(request.form.getlist("loras"))
    return [(dict(shared), {"image": f.read()}) for f in images], len(images)


@bp.post("/api/batches")
def create_batch() -> Response:
    """Several jobs at once; an invalid entry is reported and the others run."""
    entries, count = _batch_entries()
    if count == 0:
        raise ApiError(400, "images: a batch needs at least one image (or JSON jobs)", "images")
    if count > MAX_BATCH:
        raise ApiError(422, f"jobs: at most {MAX_BATCH} entries per batch", "jobs")
    lora_dir = service().settings.lora_dir
    valid, errors = [], []
    for index, (fields, files) in enumerate(entries):
        try:
            valid.append(parse_submission(fields, files, lora_dir))
        except ValidationError as exc:
            err = from_validation(exc)
            errors.append({"index": index, "field": err.field, "message": err.errors[0]["message"]})
        except (ImageError, ApiError) as exc:
            err = from_image(exc) if isinstance(exc, ImageError) else exc
            errors.append({"index": index, "field": err.field, "message": err.errors[0]["message"] if err.errors
                           else err.message})  # fmt: skip
    if not valid:
        named = [{"field": f"jobs.{e['index']}.{e['field']}", "message": e["message"]} for e in errors]
        raise ApiError(422, "; ".join(f"{e['field']}: {e['message']}" for e in named), named[0]["field"], named)
    try:
        view = service().submit_batch(valid, errors)
    except Exception as exc:  # noqa: BLE001 — the broker is down
        current_app.logger.exception("batch dispatch failed")
        raise ApiError(503, f"could not queue the batch: {exc}", headers={"Retry-After": "5"}) from None
    resp = jsonify(view)
    resp.status_code = 202
    resp.headers["Location"] = view["links"]["self"]
    return resp


def batch_or_404(batch_id: str) -> dict[str, Any]:
    view = service().batch_view(batch_id)
    if view is None:
        raise not_found("batch", "batch_id")
    return view


@bp.get("/api/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    return jsonify(batch_or_404(batch_id))


@bp.post("/api/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    batch_or_404(batch_id)
    resp = jsonify(service().cancel_batch(batch_id))
    resp.status_code = 202
    return resp


@bp.get("/api/loras")
def loras() -> Response:
    """The LoRA files jobs may name, with their size and detected format."""
    return jsonify({"loras": lora_files.list_loras(service().settings.lora_dir)})


@bp.get("/api/info")
def info() -> Response:
    svc = service()
    workers = svc.workers()
    profiles = sorted({(w.get("profile") or {}).get("name", "?") for w in workers})
    noise = any((w.get("profile") or {}).get("is_noise") for w in workers)
    hub = svc.hub
    return jsonify({"workers": workers, "profiles": profiles, "is_noise": noise,
                    "hub": {**hub.stats, "channels": hub.channels},
                    "settings": svc.settings.public()})  # fmt: skip
