"""LoRAs, timestamped prompts and batches through the API, on the live stack."""

from __future__ import annotations

import base64
import json
import shutil
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file

from .conftest import png_bytes
from .test_lora import TARGETS

pytestmark = pytest.mark.slow


def _ended(live, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (job := live.job(job_id))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


@pytest.fixture(scope="module")
def loras(live):
    d = live.root / "loras"
    g = torch.Generator().manual_seed(1)
    save_file({f"transformer.{n}.lora_{ab}.weight": torch.randn(*(shape if ab == "B" else (2, fi)), generator=g) * 0.3
               for n, (fi, fo) in TARGETS.items() for ab, shape in (("A", None), ("B", (fo, 2)))},
              str(d / "wiggle.safetensors"))  # fmt: skip
    (d / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}garbage")
    yield d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()


def test_loras_are_listed_named_at_submit_and_recorded(live, loras):
    listed = {e["name"]: e for e in httpx.get(live.base + "/api/loras").json()["loras"]}
    assert listed["wiggle"]["format"] == "diffusers" and listed["wiggle"]["size"] > 0
    r = httpx.post(live.base + "/api/jobs", files={"image": ("a.png", png_bytes(), "image/png")},
                   data={"total_second_length": "1", "steps": "2", "loras": "wiggle:0.7"})  # fmt: skip
    assert r.status_code == 202, r.text
    assert r.json()["params"]["loras"] == [{"name": "wiggle", "weight": 0.7}]
    done = _ended(live, r.json()["id"])
    assert done["state"] == "succeeded"
    (lora,) = done["result"]["loras"]
    assert lora["name"] == "wiggle" and lora["weight"] == 0.7 and len(lora["sha256"]) == 64

    unknown = httpx.post(live.base + "/api/jobs", files={"image": ("a.png", png_bytes(), "image/png")},
                         data={"loras": "nope:1"})  # fmt: skip
    assert unknown.status_code == 422 and unknown.json()["field"] == "loras.0.name"
    traversal = httpx.post(live.base + "/api/jobs", json={"image": base64.b64encode(png_bytes()).decode(),
                                                         "loras": [{"name": "../wiggle"}]})  # fmt: skip
    assert traversal.status_code == 422 and traversal.json()["field"].startswith("loras.0.name")

    broken = httpx.post(live.base + "/api/jobs", files={"image": ("a.png", png_bytes(), "image/png")},
                        data={"total_second_length": "1", "steps": "2", "loras": "broken"})  # fmt: skip
    failed = _ended(live, broken.json()["id"])
    assert failed["state"] == "failed" and "broken.safetensors: not a readable safetensors file" in failed["error"]
    after = live.submit()  # the worker goes on
    assert _ended(live, after["id"])["state"] == "succeeded"


def test_the_original_apis_lora_fields_select_a_lora(live, loras):
    r = httpx.post(live.base + "/generate", files={"image": ("a.png", png_bytes(), "image/png")},
                   data={"video_length": "1", "steps": "2", "lora_path": "/models/loras/wiggle.safetensors",
                         "lora_scale": "0.5"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert live.job(r.json()["job_id"])["params"]["loras"] == [{"name": "wiggle", "weight": 0.5}]
    swagger = httpx.post(live.base + "/generate", files={"image": ("a.png", png_bytes(), "image/png")},
                         data={"video_length": "1", "steps": "2", "lora_path": "", "lora_scale": "1.0"})  # fmt: skip
    assert swagger.status_code == 200 and live.job(swagger.json()["job_id"])["params"]["loras"] == []


def test_timestamped_prompts_show_the_active_prompt(live):
    from .wsclient import watch

    job = live.submit(total_second_length=3, steps=2, prompt="idle [0s: a wave] [1.1s: a spin]",
                      model="framepack-f1")  # fmt: skip
    w = watch(live.ws_base + job["links"]["ws"])
    w.join(90)
    prompts = [m.get("prompt") for m in w.of_type("progress") if m.get("step")]
    assert prompts[0] == "a wave" and prompts[-1] == "a spin"
    side = json.loads((live.root / "results" / job["id"] / "video.json").read_text())
    assert [s["text"] for s in side["prompt_schedule"]] == ["a wave", "a spin"]


def test_a_batch_reports_its_invalid_entry_and_runs_the_others(live):
    img = base64.b64encode(png_bytes()).decode()
    r = httpx.post(live.base + "/api/batches", json={
        "defaults": {"total_second_length": 1, "steps": 2},
        "jobs": [{"image": img, "prompt": "one"}, {"image": img, "steps": 999}, {"image": img, "prompt": "three"}],
    })  # fmt: skip
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["total"] == 2 and batch["errors"] == [
        {"index": 1, "field": "steps", "message": "Input should be less than or equal to 100"}]
    assert [j["prompt"] for j in batch["jobs"]] == ["one", "three"]
    assert all(j["batch"] == batch["id"] for j in batch["jobs"])
    for job in batch["jobs"]:
        assert _ended(live, job["id"])["state"] == "succeeded"
    done = httpx.get(live.base + batch["links"]["self"]).json()
    assert done["counts"] == {"succeeded": 2} and done["done"] and done["errors"] == batch["errors"]

    uploads = httpx.post(live.base + "/api/batches", data={"total_second_length": "1", "steps": "2"},
                         files=[("images", ("a.png", png_bytes(), "image/png")),
                                ("images", ("b.png", png_bytes(seed=4), "image/png"))])  # fmt: skip
    assert uploads.status_code == 202 and uploads.json()["total"] == 2
    cancelled = httpx.post(live.base + uploads.json()["links"]["cancel"]).json()
    assert set(cancelled["counts"]) <= {"cancelled", "succeeded", "running"}
    for job in cancelled["jobs"]:
        assert _ended(live, job["id"])["state"] in ("cancelled", "succeeded")
    assert httpx.get(live.base + "/api/batches/nope").status_code == 404
