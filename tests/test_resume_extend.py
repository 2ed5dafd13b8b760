"""Never pay twice for a finished section: a killed worker's job resumes after its last
section; a finished video is extended forward.  Real worker, real SIGKILL."""

from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest

from diffusers_helper.video import read_mp4

from .wsclient import watch

pytestmark = pytest.mark.slow

RUN = {"total_second_length": 3.6, "steps": 100, "seed": 77, "use_teacache": False, "prompt": "a [2.2s: b]"}


def _ended(live, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (job := live.job(job_id))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def _video(live, job: dict, path) -> np.ndarray:
    path.write_bytes(httpx.get(live.base + job["result"]["video_url"]).content)
    return read_mp4(path)


def test_a_killed_worker_costs_only_the_unfinished_section(live, tmp_path):
    job = live.submit(**RUN)
    w = watch(live.ws_base + job["links"]["ws"], timeout=300)
    deadline = time.monotonic() + 120
    while not any(len(m.get("sections_done") or []) >= 2 for m in w.messages):
        assert time.monotonic() < deadline, "section 2 never finished"
        time.sleep(0.002)
    pid = int(live.redis().hget(f"fp:job:{job['id']}", "worker").decode().rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)  # after section 2 of 3, as the OOM killer would
    w.join(300)
    done = _ended(live, job["id"])
    assert done["state"] == "succeeded" and done["attempts"] == 2
    assert done["result"]["resumed_from_section"] == 2
    seqs = w.seqs()
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "the watcher missed updates across the restart"
    assert any("Resumed after section 2/3" in (m.get("stage") or "") for m in w.messages)
    assert [s["section"] for s in done["sections_done"]] == [1, 2, 3]

    reference = live.submit(**RUN)  # the same job, never interrupted
    ref = _ended(live, reference["id"])
    assert np.array_equal(_video(live, done, tmp_path / "a.mp4"), _video(live, ref, tmp_path / "b.mp4"))


def test_a_finished_video_is_extended_and_the_rest_is_refused_clearly(live, tmp_path):
    first = live.submit(total_second_length=2.4, steps=3, seed=5, model="framepack-f1", prompt="a walk")
    original = _ended(live, first["id"])
    r = httpx.post(f"{live.base}/api/jobs/{first['id']}/extend", json={"seconds": 1.2, "prompt": "a jump"})
    assert r.status_code == 202, r.text
    ext = r.json()
    assert ext["extends"] == first["id"] and ext["params"]["seed"] == 5 and ext["params"]["prompt"] == "a jump"
    done = _ended(live, ext["id"])
    assert done["state"] == "succeeded" and done["result"]["extended_sections"] == 2
    assert [s["section"] for s in done["sections_done"]] == [3]
    a, b = _video(live, original, tmp_path / "a.mp4"), _video(live, done, tmp_path / "b.mp4")
    assert len(b) == len(a) + 36
    kept = len(a) - 33  # the frames before the blend with the new section
    assert np.abs(b[:kept].astype(int) - a[:kept].astype(int)).mean() < 1.0

    queued = live.submit(total_second_length=6, steps=40)
    assert httpx.post(f"{live.base}/api/jobs/{queued['id']}/extend", json={"seconds": 2}).status_code == 409
    httpx.post(f"{live.base}/api/jobs/{queued['id']}/cancel")
    assert httpx.post(f"{live.base}/api/jobs/nope/extend", json={"seconds": 2}).status_code == 404
    bad = httpx.post(f"{live.base}/api/jobs/{first['id']}/extend", json={"seconds": 500})
    assert bad.status_code == 422 and bad.json()["field"] == "seconds"

    checkpoint = live.root / "results" / first["id"] / "video-checkpoint.safetensors"
    assert checkpoint.is_file()
    assert httpx.delete(f"{live.base}/api/jobs/{first['id']}").status_code == 204
    assert not checkpoint.exists()  # deleting a job removes its checkpoint
