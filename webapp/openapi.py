"""The OpenAPI 3 document, generated from the parameter schema (not a second copy)."""

from __future__ import annotations

from typing import Any

from diffusers_helper.params import JobParams


def _params_schema() -> dict[str, Any]:
    schema = JobParams.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return schema, defs


def document() -> dict[str, Any]:
    params, defs = _params_schema()
    submit_props = {k: v for k, v in params["properties"].items() if k != "end_image"}
    image = {"type": "string", "format": "binary"}
    job_ref = {"$ref": "#/components/schemas/Job"}
    err = {"description": "Error naming the field", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    mp4 = {"description": "video/mp4 (supports HTTP Range)", "content": {"video/mp4": {"schema": image}}}
    not_found = {"description": "Unknown job", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "openapi": "3.0.3",
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
                                "properties": {"image": image, "end_image": image, **submit_props}}},
                            "application/json": {"schema": {"type": "object", "required": ["image"],
                                "properties": {"image": {"type": "string", "description": "base64 or data URL"},
                                               "end_image": {"type": "string"}, **submit_props}}},
                        },
                    },  # fmt: skip
                    "responses": {"202": {"description": "Queued", "content": {"application/json": {"schema": job_ref}}},
                                  "400": err, "413": err, "422": err, "503": err},  # fmt: skip
                },
                "get": {
                    "summary": "List jobs, newest first",
                    "parameters": [
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                    ],
                    "responses": {"200": {"description": "A page of job summaries"}},
                },
            },
            "/api/jobs/{job_id}": {
                "get": {"summary": "Job snapshot", "parameters": job_id,
                        "responses": {"200": {"description": "Snapshot", "content": {"application/json": {"schema": job_ref}}}, "404": not_found}},
                "delete": {"summary": "Delete a finished job and its files", "parameters": job_id,
                           "responses": {"204": {"description": "Deleted"}, "404": not_found, "409": err}},
            },  # fmt: skip
            "/api/jobs/{job_id}/cancel": {"post": {"summary": "Cancel (cooperative)", "parameters": job_id,
                "responses": {"202": {"description": "Cancelling"}, "404": not_found, "409": err}}},
            "/api/jobs/{job_id}/video": {"get": {"summary": "Final video", "parameters": job_id, "responses": {"200": mp4, "206": mp4, "404": not_found}}},
            "/api/jobs/{job_id}/sections/{k}": {"get": {"summary": "The video as written after section k", "parameters": job_id + [
                {"name": "k", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}], "responses": {"200": mp4, "206": mp4, "404": not_found}}},
            "/api/jobs/{job_id}/input": {"get": {"summary": "Normalised input image", "parameters": job_id,
                "responses": {"200": {"description": "image/png", "content": {"image/png": {"schema": image}}}, "404": not_found}}},
            "/api/info": {"get": {"summary": "Live workers, their model profile and device", "responses": {"200": {"description": "Info"}}}},
            "/healthz": {"get": {"summary": "Process up", "responses": {"200": {"description": "OK"}}}},
            "/readyz": {"get": {"summary": "Broker answers and a worker with its model consumes 'gpu'",
                                "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready, with the reason"}}}},
            "/generate": {"post": {"summary": "Original API: submit (video_length, sampling_mode reverse|forward)", "responses": {"200": {"description": "{job_id, message}"}, "422": err}}},
            "/status/{job_id}": {"get": {"summary": "Original API: status (progress 0-100)", "parameters": job_id, "responses": {"200": {"description": "Status"}, "404": not_found}}},
            "/stream/status/{job_id}": {"get": {"summary": "Original API: Server-Sent Events (progress with preview_image_base64, then status)", "parameters": job_id,
                "responses": {"200": {"description": "text/event-stream"}}}},
            "/result/{job_id}": {"get": {"summary": "Original API: result", "parameters": job_id, "responses": {"200": {"description": "Result"}}}},
            "/download/video/{job_id}": {"get": {"summary": "Original API: download the video", "parameters": job_id, "responses": {"200": mp4}}},
            "/cancel/{job_id}": {"post": {"summary": "Original API: cancel", "parameters": job_id, "responses": {"202": {"description": "Cancelling"}}}},
            "/queue": {"get": {"summary": "Original API: queue", "responses": {"200": {"description": "Queued and processing jobs"}}}},
        },  # fmt: skip
        "components": {
            "schemas": {
                **defs,
                "JobParams": params,
                "Error": {"type": "object", "properties": {"error": {"type": "string"}, "field": {"type": "string"},
                          "errors": {"type": "array", "items": {"type": "object"}}}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"},
                    "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "position": {"type": "integer", "nullable": True},
                    "progress": {"type": "number", "minimum": 0, "maximum": 1},
                    "seq": {"type": "integer"}, "step": {"type": "integer", "nullable": True},
                    "section": {"type": "integer", "nullable": True}, "eta": {"type": "number", "nullable": True},
                    "preview": {"type": "object", "nullable": True}, "sections_done": {"type": "array", "items": {"type": "object"}},
                    "result": {"type": "object", "nullable": True}, "error": {"type": "string", "nullable": True},
                    "params": {"$ref": "#/components/schemas/JobParams"}, "links": {"type": "object"}}},
            },  # fmt: skip
        },
    }
