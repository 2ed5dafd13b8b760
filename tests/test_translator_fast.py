"""The original API as a translator, and the typed snapshot, without servers (the fast lane's
embedded Valkey only): its ranges are our schema's, its words one table, its errors FastAPI's;
a snapshot is the JobSnapshot model, and what clients get of it."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from diffusers_helper.params import JobParams, bounds
from tasks.protocol import ORIGINAL_STATUS, JobState
from tasks.snapshot import JobSnapshot, build_snapshot
from webapp.original import OURS, original_word

from .conftest import png_bytes


@pytest.fixture
def client(settings):
    from webapp import create_app

    return create_app({"SETTINGS": settings, "SWEEPER": False}).test_client()


def test_out_of_range_values_are_clamped_to_our_schemas_bounds_and_reported(client):
    form = {"video_length": "500", "steps": "0", "cfg": "99", "gs": "-3", "rs": "7", "gpu_memory_preservation": "1",
            "mp4_crf": "60"}  # fmt: skip
    resp = client.post("/generate", data={"image": (io.BytesIO(png_bytes()), "a.png"), **form})
    assert resp.status_code == 200, resp.json
    adjusted = resp.json["adjusted"]
    assert set(adjusted) == set(form)
    for name, raw in form.items():
        low, high = bounds(JobParams, OURS[name])
        assert adjusted[name]["used"] == (low if float(raw) < low else high), name
    params = client.get(f"/api/jobs/{resp.json['job_id']}").json["params"]
    assert params["total_second_length"] == bounds(JobParams, "total_second_length")[1]
    assert params["steps"] == bounds(JobParams, "steps")[0]


def test_the_original_words_come_from_one_table():
    for state in JobState:
        word = original_word({"state": state.value, "error": "boom"})
        assert word.startswith(ORIGINAL_STATUS[state])
    assert original_word({"state": "failed", "error": "boom"}) == "failed - boom"
    assert original_word({"state": "queued"}) == "pending"


def test_errors_in_its_routes_carry_fastapis_detail_and_ours_do_not(client):
    assert client.get("/status/nope").json == {"detail": "Job not found"}
    assert "detail" not in client.get("/api/jobs/nope").json


def _record(**extra) -> dict:
    return {"id": "j1", "state": "succeeded", "seq": 3, "created_at": 1.0, "attempts": 1, "params": {"prompt": "p"},
            "result": {"video": "video.mp4", "frames": 37, "seconds": 1.2}, **extra}  # fmt: skip


def test_a_snapshot_is_the_model_and_clients_get_the_url_not_the_file_name():
    view = build_snapshot(_record(), None, position=None, alive=False, heartbeat_ttl=20)
    assert isinstance(view, JobSnapshot) and view.result.frames == 37
    wire = view.wire()
    assert wire["state"] == "succeeded" and wire["status"] == "completed" and wire["progress"] == 1.0
    assert "video" not in wire["result"] and wire["result"]["video_url"] == "/api/jobs/j1/video"
    with pytest.raises(ValidationError):  # the builder and the model cannot drift apart
        JobSnapshot.model_validate({**wire, "surprise": 1})


FILE_ROUTES = {"`GET /api/jobs/<id>/video`": "/api/jobs/{job_id}/video",
               "`GET /api/jobs/<id>/sections/<k>`": "/api/jobs/{job_id}/sections/{k}",
               "`GET /api/jobs/<id>/input`": "/api/jobs/{job_id}/input"}  # fmt: skip


def test_the_protocol_docs_error_codes_for_files_are_the_servers(client):
    import re

    from stack import ROOT
    from webapp import openapi

    rows = {line.split("|")[1].strip(): line.split("|")[3] for line in (ROOT / "docs/protocol.md").read_text()
            .splitlines() if line.startswith("| `GET /api/jobs/<id>/")}  # fmt: skip
    doc = openapi.document()["paths"]
    for row, path in FILE_ROUTES.items():
        documented = set(re.findall(r"\b4\d\d\b", rows[row]))
        served = {code for code in doc[path]["get"]["responses"] if code.startswith("4")}
        assert documented == served, (row, documented, served)
    queued = client.post("/api/jobs", data={"image": (io.BytesIO(png_bytes()), "a.png")}).json["id"]
    resp = client.get(f"/api/jobs/{queued}/video")
    assert resp.status_code == 409 and resp.json["field"] == "state"  # as the doc says: not succeeded yet
