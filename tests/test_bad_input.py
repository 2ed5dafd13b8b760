"""Every bad input is a 4xx at submit, on both APIs, naming the field; nothing reaches a
worker known to fail, and no answer is a 500 or carries NaN (issue 20's list, each tried)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import redis

from tasks.protocol import Keys

from .conftest import png_bytes


def _strict_json(data: bytes) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)


@pytest.fixture
def client(settings, tmp_path):
    from webapp import create_app

    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "broken.safetensors").write_bytes(b"\xff" * 16)  # /api/loras lists it as unreadable
    s = dataclasses.replace(settings, lora_dir=loras)
    return create_app({"SETTINGS": s, "SWEEPER": False}).test_client()


def _queued(settings) -> int:
    return redis.Redis.from_url(settings.store_url).zcard(Keys.QUEUED)


def _form(**fields) -> dict:
    return {"image": (io.BytesIO(png_bytes()), "i.png"), **{k: str(v) for k, v in fields.items()}}


@pytest.mark.parametrize("fields, field, says", [
    ({"prompt": "[99999s: x]"}, "prompt", "out of range"),
    ({"prompt": "a [6s: b]", "total_second_length": 5}, "prompt", "starts after the video ends"),
    ({"total_second_length": "nan"}, "total_second_length", "not a number"),
    ({"cfg": "inf"}, "cfg", "not a number"),
    ({"loras": "broken"}, "loras.0.name", "not a safetensors file"),
])  # fmt: skip
def test_form_submissions_that_would_fail_later_are_refused_now(client, settings, fields, field, says):
    resp = client.post("/api/jobs", data=_form(**fields))
    body = _strict_json(resp.data)
    assert resp.status_code == 422 and body["field"] == field and says in body["error"], body
    assert _queued(settings) == 0


def test_json_prompt_spans_outside_the_video_are_refused(client, settings):
    body = {"image": "data:image/png;base64," + __import__("base64").b64encode(png_bytes()).decode(),
            "total_second_length": 2, "prompts": [{"start": 0, "text": "a"}, {"start": 3, "text": "b"}]}  # fmt: skip
    resp = client.post("/api/jobs", json=body)
    assert resp.status_code == 422 and resp.json["field"] == "prompts", resp.json
    assert _queued(settings) == 0


@pytest.mark.parametrize("path", ["/api/jobs", "/api/batches"])
def test_json_nested_too_deeply_is_a_400_not_a_500(client, path):
    deep = b"[" * 100_000 + b"]" * 100_000
    resp = client.post(path, data=deep, content_type="application/json")
    assert resp.status_code == 400 and resp.json["field"] == "body" and "nested" in resp.json["error"]


def test_the_original_api_refuses_in_its_own_shape(client, settings):
    long = client.post("/generate", data=_form(prompt="x" * 5000))
    assert long.status_code == 422, long.json
    (err,) = long.json["detail"]
    assert err["loc"] == ["body", "prompt"] and "4000" in err["msg"]
    late = client.post("/generate", data=_form(prompt="[9s: x]", video_length=3))
    assert late.status_code == 422 and late.json["detail"][0]["loc"] == ["body", "prompt"]
    lora = client.post("/generate", data=_form(lora_path="/models/broken.safetensors"))
    assert lora.status_code == 422 and lora.json["detail"][0]["loc"] == ["body", "lora_path"]
    assert _queued(settings) == 0


def test_the_original_api_never_answers_nan(client, settings):
    resp = client.post("/generate", data=_form(video_length="nan", lora_scale="inf"))
    body = _strict_json(resp.data)  # was {"adjusted": {"video_length": {"requested": NaN, ...}}}
    assert resp.status_code == 200
    assert body["adjusted"]["video_length"] == {"requested": "nan", "used": 5.0}
    assert _queued(settings) == 1


def test_metrics_count_stored_jobs_and_refusals_by_reason(client, settings):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/api/jobs", data=_form(total_second_length="nan"))
    client.post("/generate", data=_form(prompt="x" * 5000))
    assert client.post("/api/jobs", data=_form(steps=1)).status_code == 202
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)) for s in f.samples}
    assert got[("framepack_jobs_submitted_total", ())] == 1  # stored jobs only (refused tries counted 3 before)
    assert got[("framepack_jobs_refused_total", (("reason", "invalid"),))] == 2
    assert got[("framepack_jobs_refused_total", (("reason", "queue"),))] == 0


def test_a_full_queue_counts_as_a_refusal(settings, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from webapp import create_app

    client = create_app({"SETTINGS": dataclasses.replace(settings, max_queue=1), "SWEEPER": False}).test_client()
    assert client.post("/api/jobs", data=_form(steps=1)).status_code == 202
    full = client.post("/api/jobs", data=_form(steps=1))
    assert full.status_code == 503 and full.json["field"] == "queue"
    text = client.get("/metrics").get_data(as_text=True)
    got = {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("framepack_jobs_refused_total", (("reason", "queue"),))] == 1
    assert got[("framepack_jobs_submitted_total", ())] == 1
