"""HTTP and WebSocket tier (never imports torch).

``create_app()`` is the factory gunicorn runs (``webapp:create_app()``); tests build apps
with their own config.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, send_from_directory
from werkzeug.exceptions import HTTPException

from tasks import settings

from . import api, compat, openapi, ws
from .service import Service

log = logging.getLogger("framepack.web")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.json.sort_keys = False  # snapshots read in their own order
    app.config.update(
        REDIS_URL=settings.store_url(),
        RESULTS_DIR=str(settings.results_dir()),
        MAX_CONTENT_LENGTH=int(os.environ.get("FRAMEPACK_MAX_UPLOAD_BYTES", 32 * 2**20)),
        HUB_POLL_INTERVAL=2.0,
        WS_SEND_BUFFER=int(os.environ.get("FRAMEPACK_WS_SEND_BUFFER", 256 * 1024)),
    )
    app.config.update(config or {})
    service = Service(app.config["REDIS_URL"], Path(app.config["RESULTS_DIR"]),
                      poll_interval=app.config["HUB_POLL_INTERVAL"])  # fmt: skip
    app.extensions["framepack"] = service
    service.start_janitor()

    app.register_blueprint(api.bp)
    app.register_blueprint(compat.bp)
    ws.init_app(app)

    @app.get("/")
    @app.get("/jobs/<job_id>")
    def page(job_id: str | None = None) -> Response:
        """The browser UI: one page; the job view is routed client-side (shareable URLs)."""
        resp = send_from_directory(app.static_folder, "index.html")
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"ok": True})

    @app.get("/readyz")
    def readyz() -> Response:
        ok, reason = service.ready()
        resp = jsonify({"ready": ok, "reason": reason})
        resp.status_code = 200 if ok else 503
        return resp

    @app.get("/api/openapi.json")
    def openapi_json() -> Response:
        return jsonify(openapi.document())

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        unknown_job = exc.code == 404 and str(exc.description).startswith("unknown job")
        field = "body" if exc.code == 413 else "job_id" if unknown_job else None
        message = "request body too large" if exc.code == 413 else (exc.description or exc.name)
        errors = [{"field": field, "message": message}] if field else []
        resp = jsonify({"error": message, "field": field, "errors": errors})
        resp.status_code = exc.code or 500
        return resp

    # Everything allocated so far (modules, the app) lives as long as the process: keep it
    # out of the collector's way, so full collections stay short under many sockets.
    gc.freeze()
    profile = settings.profile_spec()
    log.warning("framepack web tier: profile %s%s", profile, " (tiny: videos are noise)" if profile == "tiny" else "")
    return app
