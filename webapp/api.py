"""REST API: ``/api/jobs`` and friends.  Views only translate HTTP to :class:`Service` calls;
errors are raised as :class:`webapp.errors.ApiError` and rendered by one handler.

Who may do what: the caller (:func:`webapp.auth.principal`) sees, watches, cancels and
deletes only its own jobs unless it is an admin (another's job is 404, as if it did not
exist, so ids do not leak); its submissions are held to its role's limits and its queue
limit, all checked before anything is stored."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import ValidationError

from diffusers_helper import lora_files
from diffusers_helper.params import ExtendParams, JobParams
from tasks.lifecycle import QueueFull
from tasks.protocol import INPUT_FILE, TERMINAL, JobState
from tasks.webhooks import WebhookRefused, WebhookSpec, check_url

from . import sse
from .auth import Principal, principal, tokens
from .errors import ApiError, from_image, from_validation, not_found
from .jobs import queue_refusal, serve_file, service, visible_owner, visible_snapshot
from .offload import off_loop
from .uploads import ImageError, decode_base64, normalise

bp = Blueprint("api", __name__)

#: Paging bounds of GET /api/jobs.
MAX_LIMIT = 200
MAX_OFFSET = 2**31 - 1
#: Submission fields beside the FramePack parameters (:class:`tasks.webhooks.WebhookSpec`).
WEBHOOK_FIELDS = tuple(WebhookSpec.model_fields)


def parse_webhook(fields: dict[str, Any]) -> dict[str, Any] | None:
    """Pop ``webhook`` and ``webhook_events`` off the fields: the job record's ``webhook``
    value, or None.  ``webhook_events`` may be a list, repeated form fields or one
    comma-separated string.  400 naming ``webhook`` for a URL this server will not call."""
    url = fields.pop("webhook", None)
    events = fields.pop("webhook_events", None)
    if isinstance(events, str):
        events = [e.strip() for e in events.split(",") if e.strip()]
    if url in (None, ""):
        if events:
            raise ApiError(400, "webhook_events: needs a webhook URL", "webhook_events")
        return None
    try:
        spec = WebhookSpec.model_validate({"webhook": url, **({"webhook_events": events} if events else {})})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else "webhook"
        raise ApiError(422, f"{field}: {err['msg']}", field) from None
    try:
        check_url(spec.webhook, service().settings.webhook_allow)
    except WebhookRefused as exc:
        raise ApiError(400, exc.message, exc.field) from None
    return spec.stored()


def check_role_limits(params: JobParams, who: Principal) -> None:
    """The caller's role's limits on one job (``FRAMEPACK_<ROLE>_MAX_SECONDS`` / ``_STEPS``)."""
    max_seconds, max_steps = service().settings.job_limits(who.role)
    where = f"for {'an' if who.admin else 'a'} {who.role} token" if who.authenticated else "on this server"
    if params.total_second_length > max_seconds:
        raise ApiError(422, f"total_second_length: at most {max_seconds:g} seconds {where}", "total_second_length")
    if params.steps > max_steps:
        raise ApiError(422, f"steps: at most {max_steps} steps {where}", "steps")


def parse_submission(fields: dict[str, Any], files: dict[str, bytes], lora_dir: Path | None = None
                     ) -> tuple[JobParams, bytes, bytes | None, dict[str, Any] | None]:  # fmt: skip
    """Form/JSON fields + image bytes -> validated params, normalised images and the
    webhook (or None).

    Raises :class:`ImageError`, :class:`ApiError` (a webhook refused, a role limit, a LoRA
    the directory does not have) or pydantic's ``ValidationError``; nothing is stored.
    """
    if "image" not in files:
        raise ImageError("image", "an input image is required", status=400)
    fields = {k: v for k, v in fields.items() if v not in ("", None) or k in ("prompt", "n_prompt")}
    fields.pop("image", None)
    has_end = "end_image" in files
    fields.pop("end_image", None)
    if has_end:
        fields["end_image"] = "upload"
    webhook = parse_webhook(fields)
    params = JobParams.model_validate(fields)  # field errors before image work
    check_role_limits(params, principal())
    for i, spec in enumerate(params.loras):
        try:
            lora_files.check(lora_dir, spec.name)
        except lora_files.LoraFileError as exc:
            raise ApiError(422, f"loras.{i}.name: {exc}", f"loras.{i}.name") from None
    if params.loras:
        check_loras_runnable()
    image = off_loop(normalise, "image", files["image"])
    end = off_loop(normalise, "end_image", files["end_image"]) if has_end else None
    return params, image, end, webhook


def check_loras_runnable() -> None:
    """LoRAs cannot run on an FP8 transformer (diffusers_helper.speed): when every live worker
    runs FP8 the job is refused here, not failed on the worker."""
    workers = [w for w in service().workers() if w.get("speed")]
    if workers and all(w["speed"].get("quant") == "fp8" for w in workers):
        raise ApiError(422, "loras: the workers run their transformer in FP8 (FRAMEPACK_QUANT=fp8), which cannot "
                       "apply LoRAs; send the job without loras, or ask for a worker with FRAMEPACK_QUANT=none",
                       "loras")  # fmt: skip


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


def form_fields() -> dict[str, Any]:
    """A form's fields, with the repeated ones (LoRAs, webhook events) gathered."""
    fields: dict[str, Any] = request.form.to_dict()
    if "loras" in request.form:
        fields["loras"] = form_loras(request.form.getlist("loras"))
    if "webhook_events" in request.form:  # repeated fields, each maybe comma-separated
        fields["webhook_events"] = ",".join(request.form.getlist("webhook_events"))
    return fields


def json_body() -> Any:
    """The request's JSON (None when it is not JSON or does not parse), parsed off the event
    loop (a 32 MB batch body is a few hundred ms of CPU; the loop gets the GIL back every few
    ms meanwhile).  400 for JSON nested deeper than Python's parser recurses (a 100,000-deep
    array was a 500 with a RecursionError)."""
    if not request.is_json:
        return None
    data = request.get_data(cache=True)
    try:
        return off_loop(json.loads, data)
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply", "body") from None
    except ValueError:  # not JSON after all (the same answer as an empty body)
        return None


def read_request() -> tuple[dict[str, Any], dict[str, bytes]]:
    if request.mimetype == "application/json":
        body = json_body()
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
    files = {name: f.read() for name, f in request.files.items() if name in ("image", "end_image")}
    return form_fields(), files


@contextlib.contextmanager
def refusals_counted() -> Iterator[None]:
    """A submission refused for its input (4xx naming a field) counts in
    ``framepack_jobs_refused_total{reason="invalid"}``; queue limits count themselves."""
    try:
        yield
    except (ApiError, ImageError, ValidationError) as exc:
        if not isinstance(exc, ApiError) or exc.status in (400, 413, 415, 422):
            service().lifecycle.count_refusal("invalid")
        raise


def submit_from_request() -> dict[str, Any]:
    """``POST /api/jobs``: read, check and store one job (no room: refused before the upload
    is even decoded)."""
    with queue_errors():
        service().lifecycle.check_room(principal().owner)
    with refusals_counted():
        fields, files = read_request()
        params, image, end, webhook = parse_submission(fields, files, service().settings.lora_dir)
    with queue_errors():
        return service().submit(params, image, end, owner=principal().owner, webhook=webhook)


@contextlib.contextmanager
def queue_errors() -> Iterator[None]:
    """A queue limit is 429 (the caller's) or 503 (everyone's); a broker down is 503."""
    try:
        yield
    except QueueFull as exc:
        status, headers = queue_refusal(exc)
        raise ApiError(status, str(exc), "queue", headers=headers) from None
    except ApiError:
        raise
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
    owner = visible_owner()
    wanted = request.args.get("owner")
    if wanted is not None:
        if owner is not None and wanted != owner:
            raise ApiError(403, "owner: a user token lists its own jobs only", "owner")
        owner = wanted
    jobs, total = service().list_page(offset, limit, owner)
    query = f"&owner={wanted}" if wanted is not None else ""
    nxt = f"/api/jobs?offset={offset + limit}&limit={limit}{query}" if offset + limit < total else None
    return jsonify({"jobs": jobs, "total": total, "offset": offset, "limit": limit, "next": nxt})


def snapshot_or_404(job_id: str) -> dict[str, Any]:
    """The job's snapshot, if it exists and the caller may see it (else 404 either way)."""
    view = visible_snapshot(job_id)
    if view is None:
        raise not_found()
    return view


@bp.get("/api/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    return jsonify(snapshot_or_404(job_id))


@bp.get("/api/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    """The job's messages as server-sent events (the WebSocket stream's, one per event)."""
    snapshot_or_404(job_id)
    release = sse.admit(service().hub, lambda message, headers: ApiError(503, message, headers=headers))
    return sse.stream(sse.job_events(service(), job_id, sse.connection(request)), release)


@bp.post("/api/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    view = snapshot_or_404(job_id)
    if JobState(view["state"]) in TERMINAL:
        raise ApiError(409, f"state: the job already {view['state']}", "state")
    resp = jsonify(service().cancel(job_id))
    resp.status_code = 202
    return resp


@bp.post("/api/jobs/<job_id>/extend")
def extend_job(job_id: str) -> Response:
    """Continue a succeeded job's video forward (F1, from its last section checkpoint)."""
    view = snapshot_or_404(job_id)
    body = json_body() if request.mimetype == "application/json" else request.form.to_dict()
    if not isinstance(body, dict):
        raise ApiError(400, "body: a JSON object (or a form) with seconds", "body")
    ext = ExtendParams.model_validate(body)
    if view["state"] != JobState.SUCCEEDED.value:
        raise ApiError(409, f"state: only a succeeded job can be extended; this one is {view['state']}", "state")
    if not service().has_checkpoint(job_id):
        raise ApiError(409, "state: this job has no section checkpoint to continue from (made before checkpoints, "
                            "or its files expired)", "state")  # fmt: skip
    params = service().extension_params(view, ext)
    check_role_limits(params, principal())
    try:
        with queue_errors():
            new = service().extend(job_id, params, owner=principal().owner)
    except FileNotFoundError:
        raise ApiError(409, "state: this job's input image is no longer stored", "state") from None
    resp = jsonify(new)
    resp.status_code = 202
    resp.headers["Location"] = new["links"]["self"]
    return resp


@bp.delete("/api/jobs/<job_id>")
def delete_job(job_id: str) -> Response:
    view = snapshot_or_404(job_id)
    if JobState(view["state"]) not in TERMINAL:
        raise ApiError(409, "state: only finished jobs can be deleted; cancel it first", "state")
    service().delete(job_id)
    return Response(status=204)


def _file(job_id: str, name: str | None, field: str) -> Response:
    if not name:
        raise ApiError(404, f"{field}: no such file (yet)", field)
    return serve_file(job_id, name, field)


def _mp4(job_id: str, name: str | None) -> Response:
    return _file(job_id, name, "video")


@bp.get("/api/jobs/<job_id>/video")
def job_video(job_id: str) -> Response:
    view = snapshot_or_404(job_id)
    if view["state"] != JobState.SUCCEEDED.value:
        raise ApiError(409, f"state: no final video, the job is {view['state']}", "state")
    record = service().record(job_id) or {}
    return _mp4(job_id, (record.get("result") or {}).get("video"))


@bp.get("/api/jobs/<job_id>/sections/<int:k>")
def job_section(job_id: str, k: int) -> Response:
    view = snapshot_or_404(job_id)
    latest = service().latest_update(job_id)
    done = latest[1].get("sections_done", []) if latest else []
    name = next((s["file"] for s in done if s.get("section") == k), None)
    if name is None and JobState(view["state"]) not in TERMINAL and k >= 1 and k <= (view["sections"] or k):
        raise ApiError(409, f"state: section {k} is not written yet, the job is {view['state']}", "state")
    return _mp4(job_id, name)


@bp.get("/api/jobs/<job_id>/input")
def job_input(job_id: str) -> Response:
    snapshot_or_404(job_id)
    data = service().read_input(job_id)  # in Redis while the job is queued or running
    if data is not None:
        return Response(data, mimetype="image/png")
    return _file(job_id, INPUT_FILE, "input")  # from the store, with Range


#: Entries a batch may hold.
MAX_BATCH = 100


def _batch_entries() -> tuple[list[tuple[dict[str, Any], dict[str, bytes]]], int]:
    """``(fields, files)`` per entry: multipart ``images`` (repeated) with the shared fields,
    or JSON ``{"defaults": {...}, "jobs": [{"image": ..., overrides}]}``."""
    if request.mimetype == "application/json":
        body = json_body()
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
    shared = form_fields()
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
    for index, (fields, uploads) in enumerate(entries):
        try:
            params, image, end, webhook = parse_submission(fields, uploads, lora_dir)
            valid.append((index, params, image, end, webhook))
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
    with queue_errors():
        view = service().submit_batch(valid, errors, owner=principal().owner)
    resp = jsonify(view)
    resp.status_code = 202
    resp.headers["Location"] = view["links"]["self"]
    return resp


def batch_or_404(batch_id: str) -> dict[str, Any]:
    """The batch, if it exists and the caller may see it (else 404 either way)."""
    view = service().batch_snapshot(batch_id)
    if view is None or not principal().may_see(view.get("owner")):
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


@bp.post("/api/access")
def access() -> Response:
    """A short-lived, read-only access ticket for URLs a browser cannot add a header to
    (WebSocket, EventSource, ``<video src>``): append ``?access=<ticket>``."""
    who, toks = principal(), tokens()
    ttl = service().settings.access_ttl
    if not toks.required:
        return jsonify({"access": None, "expires_at": None, "ttl": None, "name": who.name, "role": who.role})
    ticket, expires = toks.ticket(who, ttl)
    return jsonify({"access": ticket, "expires_at": expires, "ttl": ttl, "name": who.name, "role": who.role})


@bp.get("/api/info")
def info() -> Response:
    """Profiles, the caller and the limits for everyone; workers, hub and settings for admins."""
    svc = service()
    who = principal()
    workers = svc.workers()
    profiles = sorted({(w.get("profile") or {}).get("name", "?") for w in workers})
    noise = any((w.get("profile") or {}).get("is_noise") for w in workers)
    s = svc.settings
    max_seconds, max_steps = s.job_limits(who.role)
    resolutions = sorted({(w.get("profile") or {}).get("default_resolution") for w in workers} - {None})
    body = {"profiles": profiles, "is_noise": noise, "default_resolution": resolutions[0] if resolutions else None,
            "auth": {"required": tokens().required, "name": who.name, "role": who.role},
            "limits": {"max_seconds": max_seconds, "max_steps": max_steps,
                       "max_queued": s.max_queued_per_token if tokens().required else None,
                       "max_queue": s.max_queue or None, "max_upload_bytes": s.max_upload_bytes,
                       "webhooks": bool(s.webhook_allow)}}  # fmt: skip
    hub = svc.hub  # this web process's streams (each gunicorn process has its own)
    body["streams"] = {"open": hub.open_streams, "capacity": hub.capacity or None, "refused": hub.stats["refused"]}
    if who.admin:
        body.update(workers=workers, hub={**hub.stats, "channels": hub.channels}, settings=s.public())
    return jsonify(body)
