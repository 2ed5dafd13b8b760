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

from diffusers_helper.params import JobParams
from tasks.snapshot import JobList, JobView
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


#: The original API's names for two fields (``webapp/compat.py``).
LEGACY_NAMES = {"total_second_length": "video_length", "model": "sampling_mode"}
LEGACY_MODE = {"type": "string", "enum": ["reverse", "forward"], "default": "reverse"}
#: JobParams' cross-field rule: the forward-sampling F1 model takes no end image.
F1_NO_END = {"not": {"required": ["end_image", "model"], "properties": {"model": {"const": "framepack-f1"}}}}
#: One Server-Sent Event as schemathesis (and a client) parses it.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string", "enum": ["progress", "status"]}, "data": {"type": "string"}}}  # fmt: skip


#: Operations that take the id of a job just created (OpenAPI links: a client, or a fuzzer,
#: can follow a submission to them).
JOB_OPERATIONS = {
    "getJob": "GET /api/jobs/{job_id}", "cancelJob": "POST /api/jobs/{job_id}/cancel",
    "deleteJob": "DELETE /api/jobs/{job_id}", "getVideo": "GET /api/jobs/{job_id}/video",
    "getInput": "GET /api/jobs/{job_id}/input", "legacyStatus": "GET /status/{job_id}",
    "legacyResult": "GET /result/{job_id}", "legacyCancel": "POST /cancel/{job_id}",
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


@functools.cache
def document(auth_required: bool = False, webhook_allow: tuple[str, ...] = ()) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    schemas = {
        "JobParams": _schema(JobParams, defs),
        "Job": _schema(JobView, defs),
        "JobList": _schema(JobList, defs),
        "Error": _schema(ErrorBody, defs),
    }
    params = schemas["JobParams"]
    hooks = _webhook_props(webhook_allow)
    submit_props = {**{k: v for k, v in params["properties"].items() if k != "end_image"}, **hooks}
    form_props = {k: _form_field(v) for k, v in submit_props.items()}
    needs_hook = EVENTS_NEED_WEBHOOK if hooks else {}
    legacy_props = {LEGACY_NAMES.get(k, k): LEGACY_MODE if k == "model" else v for k, v in form_props.items()}
    binary = {"type": "string", "format": "binary"}
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    err = _json(_ref("Error"), "Error naming the field")
    not_found = _json(_ref("Error"), "Unknown job (or no such file yet)")
    unavailable = _json(_ref("Error"), "Redis or the broker is unavailable, or the queue is full; retry "
                        "(see Retry-After)")
    retry_after = {"Retry-After": {"schema": {"type": "string"}}}
    too_many = {**_json(_ref("Error"), "This token has its limit of queued jobs already; retry (see Retry-After)"),
                "headers": retry_after}  # fmt: skip
    job = _json(_ref("Job"), "The job's snapshot")
    mp4 = {"description": "video/mp4 (supports HTTP Range)", "content": {"video/mp4": {"schema": binary}}}
    common = {"503": unavailable}

    def responses(**codes: Any) -> dict[str, Any]:
        return {**{k.lstrip("_"): v for k, v in codes.items()}, **common}

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
            "/api/jobs/{job_id}/cancel": {"post": {"summary": "Cancel (cooperative)", "parameters": job_id,
                "responses": responses(_202=job, _404=not_found, _409=err)}},
            "/api/jobs/{job_id}/video": {"get": {"summary": "Final video (409 until the job succeeded)",
                "parameters": job_id, "responses": responses(_200=mp4, _206=mp4, _304={"description": "Not modified"},
                                                             _404=not_found, _409=err, _416=err)}},
            "/api/jobs/{job_id}/sections/{k}": {"get": {"summary": "The video as written after section k (409 while "
                "the job may still write it)",
                "parameters": job_id + [{"name": "k", "in": "path", "required": True,
                                          "schema": {"type": "integer", "minimum": 0}}],
                "responses": responses(_200=mp4, _206=mp4, _304={"description": "Not modified"}, _404=not_found,
                                       _409=err, _416=err)}},
            "/api/jobs/{job_id}/input": {"get": {"summary": "Normalised input image", "parameters": job_id,
                "responses": responses(_200={"description": "image/png", "content": {"image/png": {"schema": binary}}},
                                       _304={"description": "Not modified"}, _404=not_found)}},
            "/api/info": {"get": {"summary": "Live workers, their model profile and device; settings",
                                  "responses": responses(_200=_json({"type": "object"}, "Info"))}},
            "/healthz": {"get": {"summary": "Process up", "responses": {"200": _json({"type": "object"}, "OK")}}},
            "/readyz": {"get": {"summary": "Broker answers and a worker with its model consumes 'gpu'",
                                "responses": {"200": _json({"type": "object"}, "Ready"),
                                              "503": _json({"type": "object"}, "Not ready, with the reason")}}},
            "/generate": {"post": {"summary": "Original API: submit (video_length, sampling_mode reverse|forward)",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object",
                    "required": ["image"], "properties": {"image": binary, "end_image": binary, **legacy_props}}}}},
                "responses": responses(_200={**_json({"type": "object"}, "{job_id, message}"),
                                             "links": _links("$response.body#/job_id")},
                                       _400=err, _413=err, _415=err, _422=err, _429=too_many)}},
            "/status/{job_id}": {"get": {"summary": "Original API: status (progress 0-100)", "parameters": job_id,
                "responses": responses(_200=_json({"type": "object"}, "Status"), _404=not_found)}},
            "/stream/status/{job_id}": {"get": {"summary": "Original API: Server-Sent Events (progress with "
                "preview_image_base64, then status)", "parameters": job_id,
                "responses": responses(_200={"description": "text/event-stream",
                                             "content": {"text/event-stream": {"schema": SSE_EVENT}}},
                                       _404=not_found)}},
            "/result/{job_id}": {"get": {"summary": "Original API: result", "parameters": job_id,
                "responses": responses(_200=_json({"type": "object"}, "Result"), _404=not_found)}},
            "/download/video/{job_id}": {"get": {"summary": "Original API: download the video", "parameters": job_id,
                "responses": responses(_200=mp4, _206=mp4, _304={"description": "Not modified"}, _404=not_found,
                                       _409=err, _416=err)}},
            "/cancel/{job_id}": {"post": {"summary": "Original API: cancel", "parameters": job_id,
                "responses": responses(_202=job, _404=not_found, _409=err)}},
            "/queue": {"get": {"summary": "Original API: queue",
                               "responses": responses(_200=_json({"type": "object"}, "Queued and processing jobs"))}},
        },  # fmt: skip
        "components": {"schemas": {**defs, **schemas}},
    })
    return _secure(doc) if auth_required else doc
