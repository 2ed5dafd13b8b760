"""The OpenAPI 3.1 document, generated from the models the replies are built from.

Parameters come from :class:`diffusers_helper.params.JobParams`, job snapshots and list
rows from :mod:`tasks.snapshot`, error bodies from :class:`webapp.errors.ErrorBody`:
nothing here is a second copy of a schema.  ``schemathesis`` checks replies against it
(``tests/test_openapi.py``).

The document describes the server as configured: with API tokens it declares the bearer
token and the access ticket as security schemes (the probes excepted) and the 401 replies;
with webhooks allowed, ``webhook`` is a URL that must start with an allowed prefix (a
pattern built from ``FRAMEPACK_WEBHOOK_ALLOW``).
"""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from diffusers_helper.params import ExtendParams, JobParams
from tasks.snapshot import BatchSnapshot, JobList, JobSnapshot
from tasks.webhooks import WebhookSpec

from .errors import ErrorBody

REF = "#/components/schemas/{model}"


def _schema(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    defs.update(schema.pop("$defs", {}))
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _form_field(prop: dict[str, Any]) -> dict[str, Any]:
    """A form field is a string or absent, never null: keep the non-null branch of
    ``anyOf: [X, {type: null}]``."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) != 1:
        return prop
    return {**branches[0], **{k: v for k, v in prop.items() if k not in ("anyOf", "default")}}


LEGACY_MODE = {"type": "string", "enum": ["reverse", "forward"], "default": "reverse"}
#: JobParams' cross-field rule: the forward-sampling F1 model takes no end image.
F1_NO_END = {"not": {"required": ["end_image", "model"], "properties": {"model": {"const": "framepack-f1"}}}}
#: One Server-Sent Event as schemathesis (and a client) parses it.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string", "enum": ["progress", "status"]}, "data": {"type": "string"}}}  # fmt: skip


JOB_EVENT = {"type": "object", "required": ["data"],
             "properties": {"id": {"type": "string"}, "data": {"type": "string"},
                            "event": {"type": "string", "enum": ["snapshot", "progress", "section", "final"]}}}  # fmt: skip

#: Operations that take the id of a job just created (OpenAPI links: a client, or a fuzzer,
#: can follow a submission to them).
JOB_OPERATIONS = {
    "getJob": "GET /api/jobs/{job_id}", "cancelJob": "POST /api/jobs/{job_id}/cancel",
    "deleteJob": "DELETE /api/jobs/{job_id}", "getVideo": "GET /api/jobs/{job_id}/video",
    "getInput": "GET /api/jobs/{job_id}/input", "extendJob": "POST /api/jobs/{job_id}/extend",
    "legacyStatus": "GET /status/{job_id}", "legacyCancel": "POST /cancel/{job_id}",
}  # fmt: skip


def _links(job_id: str) -> dict[str, Any]:
    return {f"to_{op}": {"operationId": op, "parameters": {"job_id": job_id}} for op in JOB_OPERATIONS}


#: Reachable without a token (``webapp.auth.OPEN_ENDPOINTS``).
OPEN_PATHS = ("/healthz", "/readyz")
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API token (FRAMEPACK_API_TOKENS)"},
    "access": {"type": "apiKey", "in": "query", "name": "access",
               "description": "A short-lived read-only ticket from POST /api/access (GET requests only)"},
}  # fmt: skip
#: ``webhook_events`` only with a ``webhook`` (JSON bodies; like F1_NO_END, the multipart
#: schemas cannot carry the rule: schemathesis' coverage phase fails on conditionals next to
#: binary fields).
EVENTS_NEED_WEBHOOK = {"anyOf": [{"required": ["webhook"]}, {"not": {"required": ["webhook_events"]}}]}


def _webhook_props(allow: tuple[str, ...]) -> dict[str, Any]:
    """``webhook`` and ``webhook_events`` as this server accepts them (none without prefixes)."""
    if not allow:
        return {}
    props = WebhookSpec.model_json_schema()["properties"]
    prefixes = []
    for prefix in allow:
        parts = urlsplit(prefix)
        prefixes.append(re.escape(prefix if parts.path else prefix + "/"))
    url = {**props["webhook"], "type": "string", "pattern": f"^(?:{'|'.join(prefixes)})"}
    events = {k: v for k, v in props["webhook_events"].items() if k != "default"}
    return {"webhook": url, "webhook_events": events}


def _secure(doc: dict[str, Any]) -> dict[str, Any]:
    """Every operation but the probes needs the bearer token (reads: or an access ticket)."""
    unauthorized = {**_json(_ref("Error"), "No API token, or an unknown or expired one"),
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}  # fmt: skip
    doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            if path in OPEN_PATHS:
                operation["security"] = []
                continue
            operation["security"] = [{"bearer": []}, {"access": []}] if method == "get" else [{"bearer": []}]
            operation["responses"]["401"] = unauthorized
    return doc


def _with_operation_ids(doc: dict[str, Any]) -> dict[str, Any]:
    by_route = {route: op for op, route in JOB_OPERATIONS.items()}
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            route = f"{method.upper()} {path}"
            operation["operationId"] = by_route.get(route) or re.sub(r"\W+", "_", route.lower()).strip("_")
    return doc


def _lora_fields(names: tuple[str, ...], params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``loras`` for JSON bodies (objects) and forms (repeated ``NAME[:WEIGHT]``), naming the
    files the LoRA directory has now, so a valid document request names only real ones."""
    base = params["properties"]["loras"]
    limit = base.get("maxItems", 8) if names else 0
    weight = {"type": "number", "minimum": -4, "maximum": 4, "default": 1.0}
    as_json = {"type": "array", "maxItems": limit, "description": base.get("description", ""),
               "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                         "properties": {"name": {"type": "string", "enum": list(names) or [""]}, "weight": weight}}}
    name = "|".join(re.escape(n) for n in names) or "(?!)"
    as_form = {"type": "array", "maxItems": limit, "description": "NAME or NAME:WEIGHT (-4..4), repeated",
               "items": {"type": "string", "pattern": rf"^({name})(:-?([0-3](\.[0-9]{{1,3}})?|4(\.0{{1,3}})?))?$"}}
    return as_json, as_form  # fmt: skip


@functools.cache
def document(auth_required: bool = False, webhook_allow: tuple[str, ...] = (),
             lora_names: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    defs: dict[str, Any] = {}
    schemas = {
        "JobParams": _schema(JobParams, defs),
        "Job": _schema(JobSnapshot, defs),
        "JobList": _schema(JobList, defs),
        "Error": _schema(ErrorBody, defs),
        "Batch": _schema(BatchSnapshot, defs),
        "ExtendParams": _schema(ExtendParams, defs),
        "LegacyError": {"type": "object", "required": ["detail"], "properties": {"detail": {"anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"]}}]}}},
    }
    params = schemas["JobParams"]
    hooks = _webhook_props(webhook_allow)
    needs_hook = EVENTS_NEED_WEBHOOK if hooks else {}
    lora_json, lora_form = _lora_fields(lora_names, params)
    submit_props = {k: v for k, v in params["properties"].items() if k != "end_image"} | {"loras": lora_json} | hooks
    # a form field carries no objects: LoRAs as NAME:WEIGHT, timestamped prompts in the prompt text
    form_props = {k: _form_field(v) for k, v in submit_props.items() if k != "prompts"} | {"loras": lora_form}
    # The original API's form, as its FastAPI server declares it: types, defaults, no bounds
    # (values outside our ranges are clamped, and the reply says so under "adjusted").
    number, integer = {"type": "number"}, {"type": "integer"}
    legacy_props = {
        "prompt": {"type": "string", "default": ""}, "video_length": {**number, "default": 5.0},
        "seed": {**integer, "default": -1}, "use_teacache": {"type": "boolean", "default": True},
        "gpu_memory_preservation": {**number, "default": 6.0}, "steps": {**integer, "default": 25},
        "cfg": {**number, "default": 1.0}, "gs": {**number, "default": 10.0}, "rs": {**number, "default": 0.0},
        "mp4_crf": {**number, "default": 16.0}, "lora_scale": {**number, "default": 1.0},
        "lora_path": {"type": "string", "enum": ["", *lora_names], "default": "",
                      "description": "A LoRA of our directory by file name (a path works: its file name counts)"},
        "sampling_mode": LEGACY_MODE, **{k: form_props[k] for k in hooks},
    }  # fmt: skip
    binary = {"type": "string", "format": "binary"}
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    err = _json(_ref("Error"), "Error naming the field")
    legacy_err = _json(_ref("LegacyError"), "FastAPI's error: {detail: text, or [{loc, msg, type}]}")
    not_found = _json(_ref("Error"), "Unknown job (or no such file yet)")
    unavailable = _json(_ref("Error"), "Redis or the broker is unavailable, or the queue is full; retry "
                        "(see Retry-After)")
    retry_after = {"Retry-After": {"schema": {"type": "string"}}}
    too_many = {**_json(_ref("Error"), "This token has its limit of queued jobs already; retry (see Retry-After)"),
                "headers": retry_after}  # fmt: skip
    job = _json(_ref("Job"), "The job's snapshot")
    mp4 = {"description": "video/mp4 (supports HTTP Range)", "content": {"video/mp4": {"schema": binary}}}
    png = {"description": "image/png (supports HTTP Range)", "content": {"image/png": {"schema": binary}}}
    presigned = {"description": "Results in a bucket with FRAMEPACK_RESULTS_REDIRECT: a short-lived presigned URL "
                 "(Location) serves the file", "headers": {"Location": {"schema": {"type": "string"}}}}  # fmt: skip
    common = {"503": unavailable}

    def responses(**codes: Any) -> dict[str, Any]:
        return {**common, **{k.lstrip("_"): v for k, v in codes.items()}}

    doc = _with_operation_ids({
        "openapi": "3.1.0",
        "info": {
            "title": "framepack-celery",
            "version": "1",
            "description": "FramePack image-to-video jobs on a Celery GPU queue, with live previews. "
            "WebSocket streams: /ws/jobs/{job_id} and /ws/jobs (see docs/protocol.md).",
        },
        "paths": {
            "/api/jobs": {
                "post": {
                    "summary": "Submit a job",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                "additionalProperties": False,
                                "properties": {"image": binary, "end_image": binary, **form_props}}},
                            "application/json": {"schema": {"type": "object", "required": ["image"],
                                "additionalProperties": False, **F1_NO_END, **({"allOf": [needs_hook]} if hooks else {}),
                                "properties": {"image": {"type": "string", "minLength": 1,
                                                         "description": "base64 or a data URL"},
                                               "end_image": {"type": "string", "minLength": 1}, **submit_props}}},
                        },
                    },  # fmt: skip
                    "responses": responses(_202={**job, "links": _links("$response.body#/id")}, _400=err, _413=err,
                                           _415=err, _422=err, _429=too_many),
                },
                "get": {
                    "summary": "List jobs, newest first (a user token: its own)",
                    "parameters": [
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                                      "maximum": 2**31 - 1}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                        {"name": "owner", "in": "query", "schema": {"type": "string"},
                         "description": "Only this token's jobs (a user token may name only itself)"},
                    ],  # fmt: skip
                    "responses": responses(_200=_json(_ref("JobList"), "A page of job summaries"), _400=err,
                                           _403=_json(_ref("Error"), "A user token asked for another's jobs")),
                },
            },
            "/api/access": {"post": {"summary": "A short-lived read-only access ticket for ?access= (browsers' "
                                                "WebSocket, EventSource and <video> URLs, which cannot carry a header)",
                "responses": responses(_200=_json({"type": "object", "required": ["access", "expires_at"],
                    "properties": {"access": {"type": ["string", "null"]}, "expires_at": {"type": ["integer", "null"]},
                                   "ttl": {"type": ["integer", "null"]}, "name": {"type": "string"},
                                   "role": {"type": "string", "enum": ["user", "admin"]}}},
                    "The ticket (null when the API is open)"))}},
            "/api/jobs/{job_id}": {
                "get": {"summary": "Job snapshot", "parameters": job_id, "responses": responses(_200=job, _404=not_found)},
                "delete": {"summary": "Delete a finished job and its files", "parameters": job_id,
                           "responses": responses(_204={"description": "Deleted"}, _404=not_found, _409=err)},
            },  # fmt: skip
            "/api/jobs/{job_id}/events": {
                "get": {"summary": "The job's stream as server-sent events: the WebSocket's messages, one per event "
                                   "(id: seq, event: snapshot|progress|section|final); ends after final",
                        "parameters": job_id,
                        "responses": responses(_200={"description": "text/event-stream",
                                                     "content": {"text/event-stream": {"schema": JOB_EVENT}}},
                                               _404=not_found,
                                               _503=_json(_ref("Error"), "At this web process's watcher capacity "
                                                          "(see Retry-After), or the job store is unavailable"))},
            },  # fmt: skip
            "/api/jobs/{job_id}/cancel": {"post": {"summary": "Cancel (cooperative)", "parameters": job_id,
                "responses": responses(_202=job, _404=not_found, _409=err)}},
            "/api/jobs/{job_id}/extend": {"post": {"summary": "Continue a succeeded job's video forward (F1): "
                "a new job", "parameters": job_id,
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {**_ref("ExtendParams")}},
                    "multipart/form-data": {"schema": {"type": "object", "required": ["seconds"],
                        "additionalProperties": False, "properties": {
                            k: _form_field(v) for k, v in schemas["ExtendParams"]["properties"].items()
                            if k != "prompts"}}}}},
                "responses": responses(_202=job, _400=err, _404=not_found, _409=err, _422=err, _429=too_many)}},
            "/api/jobs/{job_id}/video": {"get": {"summary": "Final video (409 until the job succeeded)",
                "parameters": job_id, "responses": responses(_200=mp4, _206=mp4, _302=presigned,
                                                             _304={"description": "Not modified"},
                                                             _404=not_found, _409=err, _416=err)}},
            "/api/jobs/{job_id}/sections/{k}": {"get": {"summary": "The video as written after section k (409 while "
                "the job may still write it)",
                "parameters": job_id + [{"name": "k", "in": "path", "required": True,
                                          "schema": {"type": "integer", "minimum": 0}}],
                "responses": responses(_200=mp4, _206=mp4, _302=presigned, _304={"description": "Not modified"},
                                       _404=not_found, _409=err, _416=err)}},
            "/api/jobs/{job_id}/input": {"get": {"summary": "Normalised input image", "parameters": job_id,
                "responses": responses(_200=png, _206=png, _302=presigned, _304={"description": "Not modified"},
                                       _404=not_found, _416=err)}},
            "/api/batches": {"post": {
                "summary": "Submit a batch: several images with shared fields, or a list of job specs",
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "required": ["images"],
                        "additionalProperties": False, "properties": {
                            "images": {"type": "array", "minItems": 1, "maxItems": 100, "items": binary},
                            **form_props}}},
                    "application/json": {"schema": {"type": "object", "required": ["jobs"],
                        "additionalProperties": False, "properties": {
                            "defaults": {"type": "object", "additionalProperties": False, "properties": submit_props},
                            "jobs": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                                "type": "object", "required": ["image"], "additionalProperties": False, **F1_NO_END,
                                "properties": {"image": {"type": "string", "minLength": 1},
                                               "end_image": {"type": "string", "minLength": 1},
                                               **submit_props}}}}}},
                }},
                "responses": responses(_202=_json(_ref("Batch"), "Queued: the jobs, and the entries refused"),
                                       _400=err, _413=err, _415=err, _422=err, _429=too_many)}},
            "/api/batches/{batch_id}": {"get": {"summary": "A batch: its jobs and counts by state",
                "parameters": [{"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": responses(_200=_json(_ref("Batch"), "The batch"), _404=not_found)}},
            "/api/batches/{batch_id}/cancel": {"post": {"summary": "Cancel every job of a batch that has not ended",
                "parameters": [{"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": responses(_202=_json(_ref("Batch"), "The batch"), _404=not_found)}},
            "/api/loras": {"get": {"summary": "The LoRA files jobs may name (size, detected format)",
                                   "responses": responses(_200=_json({"type": "object"}, "LoRAs"))}},
            "/api/info": {"get": {"summary": "Live workers, their model profile and device; this web process's "
                                       "watcher streams (open, capacity, refused); settings",
                                  "responses": responses(_200=_json({"type": "object"}, "Info"))}},
            "/metrics": {"get": {"summary": "Prometheus text: jobs by state, queue depth, workers (from Redis), "
                                 "watchers, preview latency, Redis errors (summed over the web processes)",
                                 "responses": responses(_200={"description": "Prometheus exposition format",
                                                              "content": {"text/plain": {"schema": {"type": "string"}}}})}},
            "/healthz": {"get": {"summary": "Process up", "responses": {"200": _json({"type": "object"}, "OK")}}},
            "/readyz": {"get": {"summary": "Broker answers and a worker with its model consumes 'gpu'",
                                "responses": {"200": _json({"type": "object"}, "Ready"),
                                              "503": _json({"type": "object"}, "Not ready, with the reason")}}},
            "/generate": {"post": {"summary": "Original API: submit (form only; no bounds: values are clamped)",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object",
                    "required": ["image"], "properties": {"image": binary, **legacy_props}}}}},
                "responses": responses(_200={**_json({"type": "object", "required": ["job_id", "message"]},
                                                     "{job_id, message[, adjusted]}"),
                                             "links": _links("$response.body#/job_id")},
                                       _400=legacy_err, _422=legacy_err, _413=legacy_err, _429=legacy_err,
                                       _500=legacy_err, _503=legacy_err)}},
            "/status/{job_id}": {"get": {"summary": "Original API: status (progress 0-100)", "parameters": job_id,
                "responses": responses(_200=_json({"type": "object"}, "Status"), _404=legacy_err)}},
            "/stream/status/{job_id}": {"get": {"summary": "Original API: Server-Sent Events (progress with "
                "preview_image_base64, then status; an unknown job: one status event)", "parameters": job_id,
                "responses": responses(_200={"description": "text/event-stream",
                                             "content": {"text/event-stream": {"schema": SSE_EVENT}}})}},
            "/result/{job_id}": {"get": {"summary": "Original API: result (404 until completed)",
                "parameters": job_id,
                "responses": responses(_200=_json({"type": "object", "required": ["video_url"]}, "Result"),
                                       _404=legacy_err)}},
            "/download/video/{job_id}": {"get": {"summary": "Original API: download the video (attachment)",
                "parameters": job_id, "responses": responses(_200=mp4, _206=mp4, _302=presigned,
                                                             _304={"description": "Not modified"}, _404=legacy_err,
                                                             _416=legacy_err)}},
            "/input_image/{job_id}": {"get": {"summary": "Original API: the input image (JPEG)", "parameters": job_id,
                "responses": responses(_200={"description": "image/jpeg",
                                             "content": {"image/jpeg": {"schema": binary}}}, _404=legacy_err)}},
            "/cancel/{job_id}": {"post": {"summary": "Original API: cancel", "parameters": job_id,
                "responses": responses(_200=_json({"type": "object", "required": ["message"]}, "Message"),
                                       _404=legacy_err)}},
            "/queue": {"get": {"summary": "Original API: recent jobs, pending, processing and finished",
                               "responses": responses(_200=_json({"type": "object", "required": ["queue"]}, "Queue"))}},
            "/worker/status": {"get": {"summary": "Original API: is a worker up, which job it processes",
                                       "responses": responses(_200=_json({"type": "object"}, "Worker"))}},
            "/loras": {"get": {"summary": "Original API: LoRA file names",
                               "responses": responses(_200=_json({"type": "object"}, "LoRAs"))}},
            "/videos": {"get": {"summary": "Original API: the finished videos' file names",
                                "responses": responses(_200=_json({"type": "array", "items": {"type": "string"}},
                                                                  "Names"))}},
            "/videos/{filename}": {"get": {"summary": "Original API: a finished video by file name",
                "parameters": [{"name": "filename", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_-]+\.mp4$"}}],
                "responses": responses(_200=mp4, _206=mp4, _302=presigned, _304={"description": "Not modified"},
                                       _400=legacy_err, _404=legacy_err, _416=legacy_err)}},
            "/video_stream": {"get": {"summary": "Original API: Server-Sent Events naming each new video",
                                      "responses": responses(_200={"description": "text/event-stream",
                                          "content": {"text/event-stream": {"schema": SSE_EVENT}}})}},
            "/cleanup_jobs": {"post": {"summary": "Original API: forget finished jobs beyond the newest "
                                                  "FRAMEPACK_MAX_COMPLETED_JOBS",
                                       "responses": responses(_200=_json({"type": "object"}, "Message"))}},
        },  # fmt: skip
        "components": {"schemas": {**defs, **schemas}},
    })
    return _secure(doc) if auth_required else doc
