"""A job's running updates: written off the sampling thread, through a Redis restart (fast lane)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis
from celery import Celery

from diffusers_helper import events as ev
from diffusers_helper.preview import LatentToRGB, make_preview
from stack import Valkey
from tasks.lifecycle import Lifecycle, new_job_id, worker_name
from tasks.protocol import Keys
from tasks.reporter import Reporter
from tasks.settings import Settings


def _progress(step: int, steps: int = 50) -> ev.Progress:
    return ev.Progress(step / steps, 1, 1, step, steps, 1.0, 1.0)


def _probe(self) -> None:
    pass


def test_sampling_never_waits_on_redis_and_the_sequence_stays_whole(tmp_path: Path):
    import torch

    valkey = Valkey(tmp_path / "valkey").__enter__()
    try:
        url = valkey.url + "/0"
        app = Celery(broker=url, backend=url)
        app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 1}}
        task = app.task(bind=True, name="probe")(_probe)  # a real task: update_state is Celery's
        lc = Lifecycle(redis.Redis.from_url(url), Settings(redis_url=url, redis_retry_seconds=0))
        job_id = new_job_id()
        lc.submit(job_id, {}, "tiny", b"png", None)
        lc.start(job_id, worker_name())
        reporter = Reporter(task, job_id, lc, time.time(), progress_interval=0)
        reporter.on_event(ev.Stage("Start sampling ..."))
        preview = make_preview(torch.randn(1, 16, 9, 8, 8), LatentToRGB(16))
        for step in range(1, 11):
            reporter.on_event(ev.PreviewReady(preview, 1, step))
            reporter.on_event(_progress(step))
        deadline = time.monotonic() + 10
        while json.loads(redis.Redis.from_url(url).get(Keys.celery_meta(job_id)) or "{}").get("result", {}).get(
            "step"
        ) != 10:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        port, data = valkey.port, valkey.data_dir
        valkey.__exit__(None, None, None)  # Redis goes away mid-job
        t = time.monotonic()
        for step in range(11, 41):
            reporter.on_event(ev.PreviewReady(preview, 1, step))
            reporter.on_event(_progress(step))
        reporter.on_event(ev.SectionDone(1, 1, Path("video-section-01.mp4"), 37, 1.23))
        while_down = time.monotonic() - t
        valkey = Valkey(data, port=port).__enter__()  # back on the same port and data
        fields = reporter.close(timeout=30)
        assert fields["step"] == 40 and fields["sections_done"][0]["section"] == 1
        meta = json.loads(redis.Redis.from_url(url).get(Keys.celery_meta(job_id)))["result"]
        # 31 events were taken while Redis was down, without waiting for it (each would have
        # waited for a connection); what could not be written was replaced by newer progress
        assert while_down < 1.0, f"on_event blocked for {while_down:.2f} s"
        assert meta["seq"] == reporter.seq == reporter.written and meta["event"] == "section"
        assert meta["step"] == 40 and meta["preview"]["frames"] == 9
        assert reporter.written < 1 + 10 + 31  # some progress was coalesced or dropped
    finally:
        valkey.__exit__(None, None, None)
