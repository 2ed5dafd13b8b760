"""HTTP and WebSocket tier (never imports torch).

``create_app()`` is the factory gunicorn runs (``webapp:create_app()``); tests build apps
with their own :class:`tasks.settings.Settings` (``config={"SETTINGS": ...}``).  Every route
but the page, ``/healthz`` and ``/readyz`` needs an API token once ``FRAMEPACK_API_TOKENS``
is set (:mod:`webapp.auth`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request, send_from_directory
from flask_swagger_ui import get_swaggerui_blueprint

from diffusers_helper import lora_files
from tasks import logs
from tasks import settings as settings_module

from . import api, auth, errors, metrics, openapi, original, ws
from .bodyguard import BodyGuard
from .service import Service

log = logging.getLogger("framepack.web")


def _settings(config: dict[str, Any]) -> settings_module.Settings:
    s = config.get("SETTINGS") or settings_module.current()
    if "REDIS_URL" in config:  # shorthand used by tests and tools: one Redis for everything
        url = config["REDIS_URL"]
        s = dataclasses.replace(s, redis_url=url, broker_url=url, result_backend=url)
    if "RESULTS_DIR" in config:
        s = dataclasses.replace(s, results_url="", results_dir=Path(config["RESULTS_DIR"]).resolve())
    return s


def create_app(config: dict[str, Any] | None = None) -> Flask:
    config = dict(config or {})
    s = _settings(config)
    logs.configure(s.log_format, s.log_level)
    app = Flask(__name__)
    app.json.sort_keys = False  # snapshots read in their own order
    app.config.update(
        SETTINGS=s,
        MAX_CONTENT_LENGTH=s.max_upload_bytes,
        HUB_POLL_INTERVAL=2.0,
        WS_SEND_BUFFER=s.ws_send_buffer,
        SWEEPER=True,
    )
    app.config.update({k: v for k, v in config.items() if k not in ("REDIS_URL", "RESULTS_DIR", "SETTINGS")})
    service = Service(s, celery=config.get("CELERY"), poll_interval=app.config["HUB_POLL_INTERVAL"])
    app.extensions["framepack"] = service
    if app.config["SWEEPER"]:
        service.start_sweeper()

    app.wsgi_app = BodyGuard(app.wsgi_app, per_address=s.max_uploads_per_address,  # type: ignore[method-assign]
                             per_token=s.max_uploads_per_token, min_rate=s.body_min_rate,
                             max_bytes=s.max_upload_bytes)  # fmt: skip
    errors.init_app(app)
    toks = auth.init_app(app, s.api_tokens)
    app.register_blueprint(api.bp)
    app.register_blueprint(original.bp)
    app.register_blueprint(metrics.bp)
    ws.init_app(app)

    @app.before_request
    def _job_context() -> None:
        """Every log line while a request about a job is served carries its id."""
        job_id = (request.view_args or {}).get("job_id")
        if job_id:
            g.job_log_token = logs.CURRENT_JOB.set(job_id)

    @app.teardown_request
    def _end_job_context(_exc: BaseException | None) -> None:
        token = g.pop("job_log_token", None)
        if token is not None:
            logs.CURRENT_JOB.reset(token)

    @app.get("/")
    @app.get("/jobs/<job_id>")
    @app.get("/batches/<job_id>")
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
    @app.get("/openapi.json")  # where the original API's clients look for it
    def openapi_json() -> Response:
        names = tuple(entry["name"] for entry in lora_files.list_loras(s.lora_dir))
        return jsonify(openapi.document(toks.required, s.webhook_allow, names))

    # /docs: an interactive page for the document, its files served from the package (no CDN)
    app.register_blueprint(get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "framepack-celery"}))

    # Everything allocated so far (modules, the app) lives as long as the process: keep it
    # out of the collector's way, so full collections stay short under many sockets.
    gc.freeze()
    noise = " (tiny: videos are noise)" if s.profile == settings_module.DEFAULT_PROFILE else ""
    log.warning("framepack web tier: profile %s%s; Redis %s; results %s", s.profile, noise,
                settings_module.mask_url(s.store_url), service.store.url)  # fmt: skip
    return app
