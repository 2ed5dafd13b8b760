"""Many hosts, many GPUs: results in a bucket, a worker per device, metrics, JSON logs.

One stack the way a team spreads it out: a real S3 endpoint (SeaweedFS), Valkey, two
workers started as ``make run GPUS=0,1`` starts them (on CPU here), two gunicorn
processes, ``LOG_FORMAT=json``.  Web tier and workers share no directory: each has its
own ``RESULTS_DIR`` / ``FRAMEPACK_WORK_DIR`` (as separate hosts would), and the tests
check that the web tier's stays empty, the workers' is cleaned after each job, and a job
whose worker dies resumes on the other worker from the checkpoint in the bucket."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from diffusers_helper.video import read_mp4

from .conftest import running_stack
from .wsclient import watch

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")
PREFIX = "jobs"


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    from stack import SeaweedS3

    root = tmp_path_factory.mktemp("scale")
    with SeaweedS3(root / "s3") as s3:
        env = {**s3.env(), "RESULTS_URL": f"s3://{s3.bucket}/{PREFIX}", "LOG_FORMAT": "json"}
        web_env = {"RESULTS_DIR": str(root / "web-disk")}
        with running_stack(root, tiny_dir, env, gpus="0,1", web_processes=2, web_env=web_env, worker_metrics=True,
                           disk_per_worker=True) as live:  # fmt: skip
            live.s3 = s3
            _wait(lambda: sum(w["ready"] for w in httpx.get(live.base + "/api/info").json()["workers"]) == 2, 180,
                  "both workers to load their model")  # fmt: skip
            yield live


def _keys(live, job_id: str) -> list[str]:
    return sorted(k.rsplit("/", 1)[1] for k in live.s3.keys(f"{PREFIX}/{job_id}/"))


def _ended(live, job_id: str, timeout: float = 180) -> dict:
    return _wait(lambda: (j := live.job(job_id))["state"] in TERMINAL and j, timeout, f"job {job_id} to end")


def test_a_job_in_a_bucket_is_watched_downloaded_with_range_and_deleted(cluster):
    job = cluster.submit(total_second_length=2, steps=3, seed=5)
    w = watch(cluster.ws_base + job["links"]["ws"])
    w.join(180)
    (final,) = w.of_type("final")
    assert final["state"] == "succeeded", final
    job_id = job["id"]

    # every section a watcher heard of was downloadable when it heard of it: the uploads
    # come first; here each is fetched in two ranged halves and decoded
    sections = final["sections_done"]
    assert [s["section"] for s in sections] == [1, 2]
    for s in sections:
        url = cluster.base + s["url"]
        size = int(httpx.head(url).headers["content-length"])
        first = httpx.get(url, headers={"Range": f"bytes=0-{size // 2 - 1}"})
        rest = httpx.get(url, headers={"Range": f"bytes={size // 2}-"})
        assert (first.status_code, rest.status_code) == (206, 206)
        assert rest.headers["content-range"] == f"bytes {size // 2}-{size - 1}/{size}"
        path = cluster.root / f"section-{s['section']}.mp4"
        path.write_bytes(first.content + rest.content)
        assert read_mp4(path).shape[0] == s["frames"]

    video = cluster.base + final["result"]["video_url"]
    ranged = httpx.get(video, headers={"Range": "bytes=0-1023"})
    assert ranged.status_code == 206 and len(ranged.content) == 1024 and ranged.content[4:8] == b"ftyp"
    full = httpx.get(video)
    assert full.status_code == 200 and full.headers["content-type"] == "video/mp4"
    (cluster.root / "video.mp4").write_bytes(full.content)
    assert read_mp4(cluster.root / "video.mp4").shape[0] == final["result"]["frames"] == 73
    inp = httpx.get(f"{cluster.base}/api/jobs/{job_id}/input")  # from the bucket: Redis dropped it at the end
    assert inp.status_code == 200 and inp.headers["content-type"] == "image/png"

    assert _keys(cluster, job_id) == ["input.png", "video-checkpoint.safetensors", "video-input.png",
                                      "video-section-01.mp4", "video-section-02.mp4", "video.json",
                                      "video.mp4"]  # fmt: skip
    sidecar = cluster.s3.client().get_object(Bucket=cluster.s3.bucket, Key=f"{PREFIX}/{job_id}/video.json")
    assert json.loads(sidecar["Body"].read())["frames"] == 73
    assert not (cluster.root / "web-disk").exists()  # the web tier never touched a disk for results
    for disk in ("disk-gpu0", "disk-gpu1"):  # the worker kept nothing after the upload
        assert not (cluster.root / disk / job_id).exists()

    assert httpx.delete(f"{cluster.base}/api/jobs/{job_id}").status_code == 204
    assert _keys(cluster, job_id) == []
    assert httpx.get(video).status_code == 404


def test_downloads_can_be_redirected_to_presigned_urls(cluster, monkeypatch):
    import dataclasses

    from tasks.settings import Settings
    from webapp import create_app

    job = cluster.submit(total_second_length=1, steps=2)
    final = _ended(cluster, job["id"])
    assert final["state"] == "succeeded"
    for key, value in cluster.s3.env().items():
        monkeypatch.setenv(key, value)
    settings = dataclasses.replace(Settings.from_env(cluster.env), results_redirect=True, presign_seconds=60,
                                   log_format="text")  # (JSON logs are for the services, not pytest)
    client = create_app({"SETTINGS": settings, "SWEEPER": False}).test_client()
    resp = client.get(final["result"]["video_url"])
    assert resp.status_code == 302 and resp.headers["Cache-Control"] == "no-store"
    assert "Expires=" in resp.location or "X-Amz-Expires=60" in resp.location
    signed = httpx.get(resp.location, headers={"Range": "bytes=0-99"})  # no credentials: the URL carries them
    assert signed.status_code == 206 and len(signed.content) == 100
    head = client.head(final["result"]["video_url"])  # a presigned GET cannot answer HEAD: served here
    assert head.status_code == 200 and int(head.headers["Content-Length"]) > 1000


def test_two_workers_run_two_jobs_at_once(cluster):
    workers = httpx.get(cluster.base + "/api/info").json()["workers"]
    assert sorted(w["gpu"] for w in workers) == ["0", "1"]  # CUDA_VISIBLE_DEVICES of each
    assert len({w["node"] for w in workers}) == 2 and all(w["node"].startswith(("gpu0@", "gpu1@")) for w in workers)
    assert {w["device"] for w in workers} == {"cpu"}
    # the speed options each worker runs with: auto on a CPU is everything off, nothing to warm up
    assert all(w["speed"] == {"compile": "off", "quant": "none", "attention": "native", "warm_up_seconds": None}
               and w["warming"] is False for w in workers)  # fmt: skip

    a, b = (cluster.submit(total_second_length=4, steps=10) for _ in range(2))

    def both_sampling():
        views = [cluster.job(a["id"]), cluster.job(b["id"])]
        return all(v["state"] == "running" and v["step"] for v in views) and views

    running = _wait(both_sampling, 120, "both jobs to sample at the same time")
    assert running[0]["worker"] != running[1]["worker"]
    ended = [_ended(cluster, j["id"]) for j in (a, b)]
    assert {v["state"] for v in ended} == {"succeeded"}
    result = ended[0]["result"]  # the job's result says how it ran
    assert result["speed"] == {"compile": "off", "quant": "none", "attention": "native"}
    assert result["cache"]["mode"] == "first_block" and result["cache"]["transformer_calls"] == 3 * 10


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}  # fmt: skip


def _sum(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_metrics_move_with_a_job(cluster):
    web_url = cluster.base + "/metrics"
    worker_urls = [f"http://127.0.0.1:{e['FRAMEPACK_WORKER_METRICS_PORT']}/metrics" for e in cluster.worker_envs]
    web0, workers0 = _scrape(web_url), [_scrape(u) for u in worker_urls]
    assert _sum(web0, "framepack_workers") == 2 and _sum(web0, "framepack_workers_ready") == 2
    assert _sum(web0, "framepack_redis_up") == 1 and ("framepack_queue_depth", ()) in web0
    assert all(_sum(w, "framepack_model_load_seconds_count") == 1 for w in workers0)
    speed = {"compile": "off", "quant": "none", "attention": "native"}
    assert _sum(web0, "framepack_worker_speed", **speed) == 2  # both workers, ready
    assert all(_sum(w, "framepack_worker_speed_info", **speed) == 1 for w in workers0)

    feed = watch(cluster.ws_base + "/ws/jobs", timeout=60)  # an all-jobs watcher, held open
    # two gunicorn processes: whichever one a scrape reaches, it counts the watcher
    _wait(lambda: _sum(_scrape(web_url), "framepack_watchers") >= 1, 30, "the watcher to be counted")
    assert all(_sum(_scrape(web_url), "framepack_watchers") >= 1 for _ in range(6))

    job = cluster.submit(total_second_length=2, steps=3)
    w = watch(cluster.ws_base + job["links"]["ws"])
    w.join(180)
    assert w.of_type("final")[0]["state"] == "succeeded"
    web1 = _scrape(web_url)
    assert _sum(web1, "framepack_jobs_submitted_total") == _sum(web0, "framepack_jobs_submitted_total") + 1
    assert _sum(web1, "framepack_jobs_finished_total", state="succeeded") == \
        _sum(web0, "framepack_jobs_finished_total", state="succeeded") + 1  # fmt: skip
    assert _sum(web1, "framepack_preview_latency_seconds_count") > _sum(web0, "framepack_preview_latency_seconds_count")
    assert _sum(web1, "framepack_jobs", state="running") == 0

    workers1 = [_scrape(u) for u in worker_urls]

    def moved(name: str, **labels: str) -> float:
        return sum(_sum(after, name, **labels) - _sum(before, name, **labels)
                   for before, after in zip(workers0, workers1, strict=True))  # fmt: skip

    assert moved("framepack_worker_jobs_total", state="succeeded") == 1
    assert moved("framepack_job_seconds_count", state="succeeded") == 1
    assert moved("framepack_step_seconds_count") == 2 * 3  # sections x steps
    assert moved("framepack_section_seconds_count") == 2
    assert moved("framepack_results_upload_bytes_total") > 10_000
    assert all(_sum(w, "framepack_worker_busy") == 0 for w in workers1)
    feed.join(0)


def test_json_logs_carry_the_job_id(cluster):
    job = cluster.submit(total_second_length=1, steps=2)
    job_id = job["id"]
    assert _ended(cluster, job_id)["state"] == "succeeded"
    assert httpx.delete(f"{cluster.base}/api/jobs/{job_id}").status_code == 204

    about: dict[str, list[dict]] = {}
    for name in ("web", "gpu0", "gpu1"):
        lines = (cluster.root / f"{name}.log").read_text().splitlines()
        assert lines, name
        records = []
        for line in lines:
            record = json.loads(line)  # every line, whoever wrote it, is one JSON object
            assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record), line
            records.append(record)
            if job_id in line:
                assert record.get("job_id") == job_id, line  # a line about the job names it
        about[name] = [r for r in records if r.get("job_id") == job_id]
    messages = [r["message"] for r in about["web"]]
    assert any("queued" in m for m in messages) and any("removed" in m for m in messages), messages
    worker_lines = about["gpu0"] + about["gpu1"]
    assert any("received" in r["message"] for r in worker_lines)  # Celery's own line
    assert any("succeeded" in r["message"] for r in worker_lines), [r["message"] for r in worker_lines]


def test_a_cancelled_job_keeps_the_sections_it_stored(cluster):
    worker_urls = [f"http://127.0.0.1:{e['FRAMEPACK_WORKER_METRICS_PORT']}/metrics" for e in cluster.worker_envs]
    before = [_scrape(u) for u in worker_urls]
    job = cluster.submit(total_second_length=4, steps=10)
    w = watch(cluster.ws_base + job["links"]["ws"])
    assert w.got_section.wait(120), "no section announced"
    assert httpx.post(f"{cluster.base}/api/jobs/{job['id']}/cancel").status_code == 202
    w.join(120)
    (final,) = w.of_type("final")
    assert final["state"] == "cancelled" and final["sections_done"]
    stored = _keys(cluster, job["id"])
    for s in final["sections_done"]:  # every section announced is in the bucket and downloads
        assert f"video-section-{s['section']:02d}.mp4" in stored
        assert httpx.get(cluster.base + s["url"], headers={"Range": "bytes=0-99"}).status_code == 206
    assert "video.mp4" not in stored and "video.json" in stored  # no final video claimed; the sidecar says why
    after = [_scrape(u) for u in worker_urls]
    assert sum(_sum(a, "framepack_worker_jobs_total", state="cancelled") - _sum(b, "framepack_worker_jobs_total",
               state="cancelled") for b, a in zip(before, after, strict=True)) == 1  # fmt: skip
    assert all(w.alive() for w in cluster.workers)  # (the pool survived a job that ended other than by success)


def test_a_job_whose_worker_dies_resumes_on_the_other_from_the_bucket_and_extends(cluster):
    """The two workers share no disk: what the second knows of the first's job is in the
    bucket (the checkpoint uploaded with each section).  Celery's own consumer controls
    decide who runs it: gpu1 stays off the queue until gpu0 has died mid-job."""
    import os
    import signal

    from celery import Celery

    control = Celery(broker=cluster.redis_url).control
    nodes = {w["gpu"]: w["node"] for w in httpx.get(cluster.base + "/api/info").json()["workers"]}
    control.cancel_consumer("gpu", destination=[nodes["1"]], reply=True)
    try:
        job = cluster.submit(total_second_length=2, steps=40, seed=9, use_teacache=False)
        w = watch(cluster.ws_base + job["links"]["ws"], timeout=300)
        assert w.got_section.wait(120), "section 1 never finished"
        first = cluster.job(job["id"])["worker"]
        assert first and cluster.job(job["id"])["state"] == "running"
        control.add_consumer("gpu", destination=[nodes["1"]], reply=True)
        control.cancel_consumer("gpu", destination=[nodes["0"]], reply=True)
        os.kill(int(first.rsplit(":", 1)[1]), signal.SIGKILL)  # gpu0's pool child, mid-section 2
        w.join(300)
        done = _ended(cluster, job["id"], 300)
    finally:
        control.add_consumer("gpu", destination=list(nodes.values()), reply=True)
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    assert done["worker"] != first and done["result"]["resumed_from_section"] == 1
    assert not (cluster.root / "disk-gpu1" / job["id"]).exists()  # released after the upload

    r = httpx.post(f"{cluster.base}/api/jobs/{job['id']}/extend", json={"seconds": 1.2})
    assert r.status_code == 202, r.text
    ext = _ended(cluster, r.json()["id"])  # the checkpoint is read back from the bucket
    assert ext["state"] == "succeeded" and ext["result"]["extended_sections"] == 2, ext
    assert ext["result"]["frames"] == done["result"]["frames"] + 36
    assert "video-checkpoint.safetensors" in _keys(cluster, ext["id"])
