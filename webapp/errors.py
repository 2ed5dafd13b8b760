"""One error type and one handler: every 4xx/5xx body has the same shape.

    {"error": "<field>: <message>", "field": "<field>" | null, "errors": [{"field", "message"}]}

Views raise :class:`ApiError` (or let pydantic's ``ValidationError``, an upload's
``ImageError``, a Redis outage or a werkzeug ``HTTPException`` escape); :func:`register`
turns each into that body, for the app (:func:`init_app`) or for one blueprint with a body
of its own shape (the original API adds FastAPI's ``detail``: ``webapp/original.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from diffusers_helper.params import field_errors
from tasks.results import StoreUnavailable

from .uploads import ImageError

log = logging.getLogger("framepack.web")


class FieldError(BaseModel):
    field: str | None
    message: str


class ErrorBody(BaseModel):
    """The body of every error reply."""

    error: str
    field: str | None
    errors: list[FieldError]


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None,
                 errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        if errors is None:
            detail = message.removeprefix(f"{field}: ") if field else message
            errors = [{"field": field, "message": detail}] if field else []
        self.errors = errors
        self.headers = headers or {}

    def renamed(self, rename: dict[str, str]) -> ApiError:
        """The same error naming its field as a caller knows it (the original API's names)."""
        if self.field not in rename:
            return self
        field = rename[self.field]
        message = self.message.replace(f"{self.field}: ", f"{field}: ", 1)
        return ApiError(self.status, message, field, headers=self.headers)


def not_found(what: str = "job", field: str = "job_id") -> ApiError:
    return ApiError(404, f"unknown {what}", field)


def error_body(exc: ApiError) -> dict[str, Any]:
    return {"error": exc.message, "field": exc.field, "errors": exc.errors}


def error_response(exc: ApiError, shape: Callable[[ApiError], dict[str, Any]] = error_body) -> Response:
    resp = jsonify(shape(exc))
    resp.status_code = exc.status
    resp.headers.update(exc.headers)
    return resp


def from_validation(exc: ValidationError, rename: dict[str, str] | None = None) -> ApiError:
    rename = rename or {}
    errs = [{**e, "field": rename.get(e["field"], e["field"])} for e in field_errors(exc)]
    return ApiError(422, "; ".join(f"{e['field']}: {e['message']}" for e in errs), errs[0]["field"], errs)


def from_image(exc: ImageError, rename: dict[str, str] | None = None) -> ApiError:
    field = (rename or {}).get(exc.field, exc.field)
    return ApiError(exc.status, f"{field}: {exc.message}", field)


def init_app(app: Flask) -> None:
    register(app)


def register(target: Flask | Blueprint, shape: Callable[[ApiError], dict[str, Any]] = error_body) -> None:
    """Render every error raised in ``target``'s requests as ``shape`` makes the body (a
    blueprint's handlers answer for its routes, the app's for the rest)."""

    def respond(exc: ApiError) -> Response:
        return error_response(exc, shape)

    target.register_error_handler(ApiError, respond)

    @target.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> Response:
        return respond(from_validation(exc))

    @target.errorhandler(ImageError)
    def _image(exc: ImageError) -> Response:
        return respond(from_image(exc))

    @target.errorhandler(redis.RedisError)
    def _store_down(exc: redis.RedisError) -> Response:
        service = current_app.extensions.get("framepack")
        if service is not None:
            service.metrics.redis_errors.labels("request").inc()
        log.warning("Redis unavailable: %s", exc)
        return respond(ApiError(503, f"the job store (Redis) is unavailable: {exc}; retry shortly",
                                headers={"Retry-After": "5"}))  # fmt: skip

    @target.errorhandler(StoreUnavailable)
    def _results_down(exc: StoreUnavailable) -> Response:
        log.warning("results store unavailable: %s", exc)
        return respond(ApiError(503, f"the results store is unavailable: {exc}; retry shortly",
                                headers={"Retry-After": "5"}))  # fmt: skip

    @target.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            err = ApiError(413, "body: request body too large", "body")
        else:
            err = ApiError(status, exc.description or exc.name)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            err.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return respond(err)
