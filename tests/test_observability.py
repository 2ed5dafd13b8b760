"""Metrics and JSON logs in-process, on a real Valkey (fast lane).  The live versions (two
workers, two gunicorn processes, a real job) are in ``tests/test_scale_out.py``."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from diffusers_helper import events as ev
from tasks.lifecycle import Lifecycle, new_job_id
from tasks.logs import JsonFormatter, job_context
from tasks.metrics import ClusterCollector, WorkerMetrics
from tasks.protocol import JobState


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def _line(record: logging.LogRecord) -> dict:
    text = JsonFormatter().format(record)
    assert "\n" not in text  # one object per line, whatever the message holds
    return json.loads(text)


def _record(msg: str, args=None, **extra) -> logging.LogRecord:
    args = (args,) if isinstance(args, dict) else args  # as logging.info(msg, mapping) passes it
    record = logging.LogRecord("framepack.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_find_the_job_id_wherever_it_is():
    assert "job_id" not in _line(_record("nothing about a job"))
    assert _line(_record("x", job_id="J1"))["job_id"] == "J1"  # extra={"job_id": ...}
    with job_context("J2"):
        line = _line(_record("line one\nline two %s", ("arg",)))
    assert line["job_id"] == "J2" and line["message"] == "line one\nline two arg"
    celery = _record("Task %(name)s[%(id)s] received", {"name": "tasks.generate_video", "id": "J3"})
    assert _line(celery)["job_id"] == "J3" and _line(celery)["message"] == "Task tasks.generate_video[J3] received"
    access = _record('%(h)s "%(r)s" %(s)s', {"h": "127.0.0.1", "r": "GET /api/jobs/J4/video HTTP/1.1", "s": "206",
                                             "U": "/api/jobs/J4/video"})  # fmt: skip
    assert _line(access)["job_id"] == "J4"
    assert "job_id" not in _line(_record("%(U)s", {"U": "/api/jobs"}))
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("framepack.test", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = _line(failed)
    assert line["level"] == "ERROR" and "ValueError: boom" in line["exc_info"]


def test_the_web_tier_logs_json_with_the_job_of_the_request(settings, monkeypatch):
    from webapp import create_app

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root.handlers[:] = []  # as under gunicorn without a log config: nobody set logging up
    try:
        app = create_app({"SETTINGS": dataclasses.replace(settings, log_format="json"), "SWEEPER": False})
        app.get("/api/jobs/<job_id>/log-probe")(lambda job_id: (logging.getLogger("framepack.web").warning("probe"),
                                                               "ok")[1])  # fmt: skip
        assert app.test_client().get("/api/jobs/J5/log-probe").status_code == 200
        logging.getLogger("framepack.web").warning("after the request")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [json.loads(raw) for raw in stream.getvalue().splitlines()]
    probe = next(x for x in lines if x["message"] == "probe")
    assert probe["job_id"] == "J5" and probe["logger"] == "framepack.web"
    assert "job_id" not in next(x for x in lines if x["message"] == "after the request")


def test_cluster_metrics_come_from_redis(valkey_url, settings):
    r = redis.Redis.from_url(valkey_url)
    lc = Lifecycle(r, settings)
    ids = [new_job_id() for _ in range(3)]
    for job_id in ids:
        lc.submit(job_id, {"prompt": "p", "seed": 1}, "tiny", b"png", None)
    lc.start(ids[0], "host:1")
    lc.finish(ids[0], JobState.SUCCEEDED, result={})
    lc.finish(ids[1], JobState.CANCELLED, reason="cancelled by user")
    lc.finish(ids[1], JobState.FAILED, error="late")  # a second end changes nothing, the counters neither
    fast = {"compile": "blocks", "quant": "fp8", "attention": "native", "warm_up_seconds": 41.0}
    workers = [{"name": "h:1", "node": "gpu0@h", "device": "cuda", "gpu": "0", "ready": True, "job": ids[0],
                "speed": fast},
               {"name": "h:2", "node": "gpu1@h", "device": "cuda", "gpu": "1", "ready": False, "job": None,
                "warming": True, "speed": {**fast, "warm_up_seconds": None}}]  # fmt: skip
    collector = ClusterCollector(r, lambda: 4, lambda: workers)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    got = _samples(generate_latest(registry).decode())
    assert got[("framepack_jobs_submitted_total", ())] == 3
    assert got[("framepack_jobs_finished_total", (("state", "succeeded"),))] == 1
    assert got[("framepack_jobs_finished_total", (("state", "cancelled"),))] == 1
    assert got[("framepack_jobs_finished_total", (("state", "failed"),))] == 0
    assert got[("framepack_jobs", (("state", "queued"),))] == 1
    assert got[("framepack_jobs", (("state", "running"),))] == 0
    assert got[("framepack_queue_depth", ())] == 4
    assert (got[("framepack_workers", ())], got[("framepack_workers_ready", ())]) == (2, 1)
    assert got[("framepack_worker_info", (("busy", "1"), ("device", "cuda"), ("gpu", "0"), ("name", "h:1"),
                                          ("node", "gpu0@h")))] == 1  # fmt: skip
    def speed(name: str) -> float:
        labels = {"attention": "native", "compile": "blocks", "quant": "fp8", "name": name}
        return got[("framepack_worker_speed", tuple(sorted(labels.items())))]

    assert (speed("h:1"), speed("h:2")) == (1, 0)  # warmed up; still warming

    down = ClusterCollector(redis.Redis(port=1, socket_connect_timeout=0.5), lambda: 0, lambda: [])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(down)
    assert _samples(generate_latest(registry).decode()) == {("framepack_redis_up", ()): 0}


def test_step_and_section_seconds_follow_generation_events():
    metrics = WorkerMetrics()
    timer = metrics.timer()
    events = [ev.Stage(ev.STAGE_TEXT), ev.Stage(ev.STAGE_SAMPLING)]
    for section in (1, 2):
        events += [ev.Progress(0.1, section, 2, step, 3, None, 0.0) for step in (1, 2, 3)]
        events.append(ev.SectionDone(section, 2, Path(f"v-{section}.mp4"), 37 * section, 1.2 * section))
    for e in events:
        timer.on_event(e)
    got = _samples(generate_latest(metrics.registry).decode())
    assert got[("framepack_step_seconds_count", ())] == 6
    assert got[("framepack_section_seconds_count", ())] == 2
    assert got[("framepack_worker_jobs_total", (("state", "succeeded"),))] == 0  # every series exists from the start


@pytest.mark.parametrize("value", ["0,1", " 0 , 1 ", "GPU-5f2a,GPU-77b1"])
def test_gpus_start_one_pinned_worker_each(value: str):
    from stack import parse_gpus, worker_specs

    devices = parse_gpus(value)
    specs = worker_specs(devices, metrics_port=9850)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == devices
    assert len({s.hostname for s in specs}) == 2 and all(s.hostname.endswith("@%h") for s in specs)
    assert [s.env["FRAMEPACK_WORKER_METRICS_PORT"] for s in specs] == ["9850", "9851"]
    assert worker_specs([])[0].hostname is None and "CUDA_VISIBLE_DEVICES" not in worker_specs([])[0].env
    with pytest.raises(ValueError, match="twice"):
        parse_gpus("0,0")
