"""The OpenAPI 3.1 document, generated from the models the replies are built from.

Parameters come from :class:`diffusers_helper.params.JobParams`, job snapshots and list
rows from :mod:`tasks.snapshot`, error bodies from :class:`webapp.errors.ErrorBody`:
nothing here is a second copy of a schema.  ``schemathesis`` checks replies against it
(``tests/test_openapi.py``).
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel

from diffusers_helper.params import JobParams
from tasks.snapshot import JobList, JobView

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


@functools.cache
def document() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    schemas = {
        "JobParams": _schema(JobParams, defs),
        "Job": _schema(JobView, defs),
        "JobList": _schema(JobList, defs),
        "Error": _schema(ErrorBody, defs),
    }
    params = schemas["JobParams"]
    submit_props = {k: v for k, v in params["properties"].items() if k != "end_image"}
    binary = {"type": "string", "format": "binary"}
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    err = _json(_ref("Error"), "Error naming the field")
    not_found = _json(_ref("Error"), "Unknown job (or no such file yet)")
    unavailable = _json(_ref("Error"), "Redis or the broker is unavailable; retry (see Retry-After)")
    job = _json(_ref("Job"), "The job's snapshot")
    mp4 = {"description": "video/mp4 (supports HTTP Range)", "content": {"video/mp4": {"schema": binary}}}
    common = {"503": unavailable}

    def responses(**codes: Any) -> dict[str, Any]:
        return {**{k.lstrip("_"): v for k, v in codes.items()}, **common}

    return {
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
                                "properties": {"image": binary, "end_image": binary, **submit_props}}},
                            "application/json": {"schema": {"type": "object", "required": ["image"],
                                "properties": {"image": {"type": "string", "description": "base64 or data URL"},
                                               "end_image": {"type": "string"}, **submit_props}}},
                        },
                    },  # fmt: skip
                    "responses": responses(_202=job, _400=err, _413=err, _415=err, _422=err),
                },
                "get": {
                    "summary": "List jobs, newest first",
                    "parameters": [
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                                      "maximum": 2**31 - 1}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                    ],  # fmt: skip
                    "responses": responses(_200=_json(_ref("JobList"), "A page of job summaries"), _400=err),
                },
            },
            "/api/jobs/{job_id}": {
                "get": {"summary": "Job snapshot", "parameters": job_id, "responses": responses(_200=job, _404=not_found)},
                "delete": {"summary": "Delete a finished job and its files", "parameters": job_id,
                           "responses": responses(_204={"description": "Deleted"}, _404=not_found, _409=err)},
            },  # fmt: skip
            "/api/jobs/{job_id}/cancel": {"post": {"summary": "Cancel (cooperative)", "parameters": job_id,
                "responses": responses(_202=job, _404=not_found, _409=err)}},
            "/api/jobs/{job_id}/video": {"get": {"summary": "Final video", "parameters": job_id,
                "responses": responses(_200=mp4, _206=mp4, _304={"description": "Not modified"}, _404=not_found,
                                       _416=err)}},
            "/api/jobs/{job_id}/sections/{k}": {"get": {"summary": "The video as written after section k",
                "parameters": job_id + [{"name": "k", "in": "path", "required": True,
                                          "schema": {"type": "integer", "minimum": 0}}],
                "responses": responses(_200=mp4, _206=mp4, _304={"description": "Not modified"}, _404=not_found,
                                       _416=err)}},
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
                "responses": responses(_200=_json({"type": "object"}, "{job_id, message}"), _400=err, _413=err,
                                       _415=err, _422=err)}},
            "/status/{job_id}": {"get": {"summary": "Original API: status (progress 0-100)", "parameters": job_id,
                "responses": responses(_200=_json({"type": "object"}, "Status"), _404=not_found)}},
            "/stream/status/{job_id}": {"get": {"summary": "Original API: Server-Sent Events (progress with "
                "preview_image_base64, then status)", "parameters": job_id,
                "responses": responses(_200={"description": "text/event-stream",
                                             "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                                       _404=not_found)}},
            "/result/{job_id}": {"get": {"summary": "Original API: result", "parameters": job_id,
                "responses": responses(_200=_json({"type": "object"}, "Result"), _404=not_found)}},
            "/download/video/{job_id}": {"get": {"summary": "Original API: download the video", "parameters": job_id,
                "responses": responses(_200=mp4, _206=mp4, _304={"description": "Not modified"}, _404=not_found,
                                       _416=err)}},
            "/cancel/{job_id}": {"post": {"summary": "Original API: cancel", "parameters": job_id,
                "responses": responses(_202=job, _404=not_found, _409=err)}},
            "/queue": {"get": {"summary": "Original API: queue",
                               "responses": responses(_200=_json({"type": "object"}, "Queued and processing jobs"))}},
        },  # fmt: skip
        "components": {"schemas": {**defs, **schemas}},
    }
