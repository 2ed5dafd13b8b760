"""The original FramePack API (its FastAPI fork), point by point, as its own tests, its
Swagger form and its React EventSource client use it — on the live stack."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from .conftest import png_bytes

pytestmark = pytest.mark.slow

#: What the fork's Swagger form sends: every field at its default.
SWAGGER = {
    "prompt": "A character doing some simple body movements.", "video_length": "5.0", "seed": "-1",
    "use_teacache": "true", "gpu_memory_preservation": "6.0", "steps": "25", "cfg": "1.0", "gs": "10.0",
    "rs": "0.0", "mp4_crf": "16.0", "lora_scale": "1.0", "lora_path": "", "sampling_mode": "reverse",
}  # fmt: skip
QUICK = {"video_length": "1", "steps": "2"}


def _generate(live, data: dict, image: bytes | None = None) -> httpx.Response:
    files = {"image": ("in.png", image or png_bytes(), "image/png")}
    return httpx.post(live.base + "/generate", data=data, files=files)


def _status(live, job_id: str) -> dict:
    return httpx.get(f"{live.base}/status/{job_id}").json()


def _until(live, job_id: str, words: tuple[str, ...], timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not (s := _status(live, job_id))["status"].startswith(words):
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    return s


def _events(live, path: str) -> list[tuple[str | None, dict]]:
    """What a browser EventSource client does: read events until `status`, then close."""
    out: list = []
    with httpx.stream("GET", live.base + path, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
                if name == "status":
                    break
    return out


def test_the_swagger_form_at_its_defaults_runs_to_completion(live, tmp_path):
    r = _generate(live, SWAGGER)
    assert r.status_code == 200 and r.json() == {"job_id": r.json()["job_id"],
                                                  "message": "Video generation job added to queue."}  # fmt: skip
    job_id = r.json()["job_id"]
    params = live.job(job_id)["params"]
    assert params["total_second_length"] == 5 and params["loras"] == [] and params["model"] == "framepack"
    assert params["seed"] >= 0  # -1 became a real seed
    events = _events(live, f"/stream/status/{job_id}")
    names = [n for n, _ in events]
    assert names[-1] == "status" and set(names[:-1]) == {"progress"}
    assert events[-1][1] == {"status": "completed", "message": "Job finished."}
    assert events[-2][1]["status"] == "completed" and events[-2][1]["progress"] == 100
    progress = [d for n, d in events if n == "progress"]
    assert all(a != b for a, b in zip(progress, progress[1:], strict=False)), "an event repeated"
    processing = [d for d in progress if d["status"] == "processing"]
    assert processing and all(set(d) >= {"job_id", "status", "progress", "progress_step", "progress_total",
                                         "progress_info"} for d in processing)  # fmt: skip
    assert all(1 <= d["progress_step"] <= d["progress_total"] == 25 for d in processing if d["progress_step"])
    preview = next(d["preview_image_base64"] for d in processing if "preview_image_base64" in d)
    assert preview.startswith("data:image/jpeg;base64,")

    done = _status(live, job_id)
    assert done == {"job_id": job_id, "status": "completed", "progress": 100.0, "progress_step": 25,
                    "progress_total": 25, "progress_info": "Finished"}  # fmt: skip
    result = httpx.get(f"{live.base}/result/{job_id}").json()
    assert result["video_url"] == f"{live.base}/download/video/{job_id}"
    assert Image.open(io.BytesIO(base64.b64decode(result["thumbnail_base64"].split(",", 1)[1]))).size == (80, 80)
    video = httpx.get(result["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.headers["content-disposition"] == f'attachment; filename="{job_id}.mp4"'
    assert httpx.post(f"{live.base}/cancel/{job_id}").json() == {"message": "Job is already completed."}
    jpeg = httpx.get(f"{live.base}/input_image/{job_id}")
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    assert f"{job_id}.mp4" in httpx.get(live.base + "/videos").json()
    assert httpx.get(f"{live.base}/videos/{job_id}.mp4").content == video.content
    assert httpx.get(f"{live.base}/videos/..%2Fsecret.mp4").status_code in (400, 404)
    assert httpx.get(f"{live.base}/videos/{job_id}.avi").json() == {"detail": "Invalid file type, only MP4 is "
                                                                               "supported."}  # fmt: skip


def test_no_bounds_values_are_clamped_and_the_reply_says_so(live):
    r = _generate(live, {**QUICK, "steps": "500", "cfg": "50", "mp4_crf": "18.7", "video_length": "0.5"})
    assert r.status_code == 200
    adjusted = r.json()["adjusted"]
    assert adjusted["steps"] == {"requested": 500, "used": 100} and adjusted["cfg"]["used"] == 32
    assert adjusted["mp4_crf"] == {"requested": 18.7, "used": 19} and adjusted["video_length"]["used"] == 1
    params = live.job(r.json()["job_id"])["params"]
    assert (params["steps"], params["cfg"], params["mp4_crf"], params["total_second_length"]) == (100, 32, 19, 1)
    httpx.post(f"{live.base}/cancel/{r.json()['job_id']}")


def test_validation_errors_have_fastapis_shape(live):
    bad = _generate(live, {**QUICK, "steps": "abc"}).json()["detail"]
    assert bad[0]["loc"] == ["body", "steps"] and bad[0]["type"] == "int_parsing" and "msg" in bad[0]
    mode = _generate(live, {**QUICK, "sampling_mode": "sideways"}).json()["detail"]
    assert mode[0]["loc"] == ["body", "sampling_mode"] and mode[0]["type"] == "enum"
    missing = httpx.post(live.base + "/generate", data=QUICK)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "image"]
    unreadable = _generate(live, QUICK, image=b"not an image")
    assert unreadable.status_code == 400 and unreadable.json()["detail"].startswith("Failed to read or process")
    lora = _generate(live, {**QUICK, "lora_path": "/loras/none.safetensors"})
    assert lora.status_code == 422 and lora.json()["detail"][0]["loc"] == ["body", "lora_path"]


def test_unknown_jobs(live):
    assert httpx.get(f"{live.base}/status/nope").json() == {"detail": "Job not found"}
    assert httpx.get(f"{live.base}/status/nope").status_code == 404
    assert httpx.post(f"{live.base}/cancel/nope").json() == {"detail": "Job not found"}
    r = httpx.get(f"{live.base}/result/nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert httpx.get(f"{live.base}/download/video/nope").status_code == 404
    gone = {"status": "error", "message": "Job not found or cleaned up."}
    assert _events(live, "/stream/status/nope") == [("status", gone)]


def test_pending_processing_cancelled_and_failed_jobs(live):
    blocker = _generate(live, {"video_length": "6", "steps": "40"}).json()["job_id"]
    pending = _generate(live, {**QUICK, "prompt": "x" * 80}).json()["job_id"]
    running = _until(live, blocker, ("processing",))
    assert running["progress_total"] == 40 and 0 <= running["progress_step"] <= 40 and 0 <= running["progress"] < 100
    assert _status(live, pending) == {"job_id": pending, "status": "pending", "progress": 0.0, "progress_step": 0,
                                      "progress_total": 2, "progress_info": ""}  # fmt: skip
    r = httpx.get(f"{live.base}/result/{pending}")
    assert r.status_code == 404 and r.json()["detail"] == f"Job '{pending}' is not completed yet (status: pending)."
    assert httpx.get(f"{live.base}/download/video/{pending}").status_code == 404

    queue = httpx.get(live.base + "/queue").json()["queue"]
    rows = {row["job_id"]: row for row in queue}
    assert rows[pending]["status"] == "pending" and rows[pending]["prompt"] == "x" * 50
    assert rows[pending]["video_length"] == 1 and rows[blocker]["status"] == "processing"
    worker = httpx.get(live.base + "/worker/status").json()
    assert worker == {"is_running": True, "processing_job_id": blocker}

    assert httpx.post(f"{live.base}/cancel/{pending}").json() == {"message": f"Cancellation requested for job "
                                                                              f"{pending}."}  # fmt: skip
    assert _status(live, pending)["status"] == "cancelled"
    assert httpx.post(f"{live.base}/cancel/{pending}").json() == {"message": "Job is already cancelled."}
    broken = _generate(live, QUICK).json()["job_id"]  # queued behind the blocker
    live.redis().delete(f"fp:job:{broken}:input")  # its input is gone: it fails
    httpx.post(f"{live.base}/cancel/{blocker}")
    assert _until(live, blocker, ("cancelled",))["progress_info"] == "cancelled by user"
    failed = _until(live, broken, ("failed", "completed"))
    assert failed["status"].startswith("failed - ValueError: input image is missing")


def test_video_stream_names_each_new_video(live):
    seen: list[str] = []

    def listen() -> None:
        with httpx.stream("GET", live.base + "/video_stream", timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    seen.append(line[6:])
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    time.sleep(0.5)  # the stream is open
    job_id = _generate(live, QUICK).json()["job_id"]
    t.join(60)
    assert seen == [f"{job_id}.mp4"]


def test_loras_docs_openapi_and_cleanup(live):
    assert httpx.get(live.base + "/loras").json() == {"loras": []}
    docs = httpx.get(live.base + "/docs/")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text and "://" not in docs.text.split(
        "<body")[0].replace("http-equiv", "")  # nothing from a CDN
    assert httpx.get(live.base + "/docs/swagger-ui-bundle.js").status_code == 200
    assert httpx.get(live.base + "/openapi.json").json() == httpx.get(live.base + "/api/openapi.json").json()
    message = httpx.post(live.base + "/cleanup_jobs").json()["message"]
    assert message.startswith("Cleanup process completed. Removed ") and message.endswith(" old job entries.")
