"""Settings, Celery's exported config and the one error shape, in-process (fast lane)."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import pytest

from stack import ROOT
from tasks.settings import Settings, mask_url

from .conftest import png_bytes


def test_settings_come_from_the_environment_once_and_name_bad_values():
    s = Settings.from_env({"REDIS_URL": "redis://u:pw@h:1/0", "FRAMEPACK_HEARTBEAT_TTL": "7",
                           "CELERY_BROKER_URL": "amqp://guest:guest@localhost//"})  # fmt: skip
    assert (s.heartbeat_ttl, s.result_backend, s.store_url) == (7, "redis://u:pw@h:1/0", "redis://u:pw@h:1/0")
    assert s.broker_url.startswith("amqp://")
    with pytest.raises(ValueError, match="FRAMEPACK_SWEEP_SECONDS"):
        Settings.from_env({"FRAMEPACK_SWEEP_SECONDS": "often"})
    assert mask_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0" and mask_url("redis://h/0") == "redis://h/0"
    assert "pw" not in json.dumps(s.public())


def test_celery_exports_its_own_settings_only_and_no_password():
    code = "from tasks import app; print(app.conf.humanize(with_defaults=False, censored=True))"
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://framepack:s3cret-Pa55@127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    names = {line.split(":", 1)[0] for line in out.stdout.splitlines() if line and not line.startswith(" ")}
    assert "s3cret-Pa55" not in out.stdout
    assert {"broker_url", "result_backend", "task_acks_late"} <= names
    assert not {"os", "Queue", "REDIS_URL", "MAX_JOB_SECONDS"} & names and not any(n.startswith("_") for n in names)


@pytest.fixture
def client(settings):
    from webapp import create_app

    return create_app({"SETTINGS": settings, "SWEEPER": False, "MAX_CONTENT_LENGTH": 64 * 1024}).test_client()


def _shape(resp, status: int, field: str | None) -> dict:
    body = resp.json
    assert resp.status_code == status, body
    assert set(body) == {"error", "field", "errors"} and body["field"] == field
    if field:
        assert body["errors"][0]["field"] == field and body["errors"][0]["message"]
    return body


def test_every_error_has_one_shape_naming_the_field(client):
    _shape(client.get("/api/jobs/nope"), 404, "job_id")
    _shape(client.get("/api/jobs?offset=-1"), 400, "offset")
    _shape(client.get("/api/jobs?offset=22382339623147663360"), 400, "offset")
    _shape(client.get("/api/jobs?limit=x"), 400, "limit")
    resp = client.put("/api/jobs")
    _shape(resp, 405, None)
    assert set(resp.headers["Allow"].split(", ")) >= {"GET", "POST"}
    _shape(client.post("/api/jobs", data={}), 400, "image")
    body = _shape(client.post("/api/jobs", data={"image": (io.BytesIO(png_bytes()), "a.png"), "steps": "0"}), 422,
                  "steps")  # fmt: skip
    assert "greater than or equal to 1" in body["errors"][0]["message"]
    _shape(client.post("/api/jobs", data={"image": (io.BytesIO(b"x" * 70_000), "a.png")}), 413, "body")
    _shape(client.post("/api/jobs", data={"image": (io.BytesIO(b"not an image"), "a.png")}), 422, "image")
    legacy = client.post("/generate", data={"image": (io.BytesIO(png_bytes()), "a.png"), "video_length": "x"})
    assert legacy.status_code == 422 and legacy.json["detail"][0]["loc"] == ["body", "video_length"]  # FastAPI's


def test_a_redis_outage_is_a_503_with_retry_after(settings):
    from stack import free_port
    from webapp import create_app

    down = f"redis://127.0.0.1:{free_port()}/0"
    s = dataclasses.replace(settings, redis_url=down, broker_url=down, result_backend=down, redis_retry_seconds=0)
    client = create_app({"SETTINGS": s, "SWEEPER": False}).test_client()
    resp = client.get("/api/jobs/x")
    _shape(resp, 503, None)
    assert resp.headers["Retry-After"] and "Redis" in resp.json["error"]
