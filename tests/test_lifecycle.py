"""The job lifecycle and the sweep on a real Valkey, without a worker (fast lane)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import redis

from tasks.lifecycle import Lifecycle, new_job_id, worker_name
from tasks.protocol import JobState, Keys, Reason
from tasks.snapshot import JobSnapshot, build_snapshot
from tasks.sweeper import Broker, Sweeper


class Feed:
    """A subscriber to the all-jobs feed."""

    def __init__(self, r: redis.Redis):
        self.ps = r.pubsub()
        self.ps.subscribe(Keys.EVENTS)
        assert self.ps.get_message(timeout=2)["type"] == "subscribe"

    def events(self, timeout: float = 0.5) -> list[dict]:
        out = []
        while (m := self.ps.get_message(timeout=timeout)) is not None:
            if m["type"] == "message":
                out.append(json.loads(m["data"]))
        return out


@pytest.fixture
def r(valkey_url):
    return redis.Redis.from_url(valkey_url)


@pytest.fixture
def lc(r, settings):
    announced: list = []
    lc = Lifecycle(r, settings, lambda job_id, event, fields: announced.append((job_id, event, fields)))
    lc.announced = announced
    return lc


def _submit(lc: Lifecycle) -> str:
    job_id = new_job_id()
    lc.submit(job_id, {"prompt": "p", "seed": 1}, "tiny", b"png", None)
    return job_id


def _meta(r, job_id) -> dict:
    return json.loads(r.get(Keys.celery_meta(job_id)))


def test_job_ids_never_look_like_a_command_line_option():
    """One id in 64 began with "-" and ``celery control terminate SIGTERM <id>`` read it as an
    option (seen in CI); operators paste ids into command lines."""
    import re

    ids = {new_job_id() for _ in range(5000)}  # ~78 would begin with "-" if nothing prevented it
    assert len(ids) == 5000 and all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)


def test_submit_queues_with_a_position_and_a_feed_row(lc, r):
    feed = Feed(r)
    first, second = _submit(lc), _submit(lc)
    assert r.zrank(Keys.QUEUED, second) == 1
    events = feed.events()
    assert [e["event"] for e in events] == ["submitted", "submitted"]
    assert events[1]["job"]["position"] == 2 and events[1]["job"]["id"] == second and events[1]["seq"] == 0
    assert lc.record(first)["state"] == "queued"


def test_start_leaves_the_queue_and_says_where_from(lc, r):
    a, b = _submit(lc), _submit(lc)
    feed = Feed(r)
    start = lc.start(b, worker_name())
    assert start.runs and start.attempts == 1
    (event,) = feed.events()
    assert (event["event"], event["state"], event["left_position"]) == ("started", "running", 2)
    assert r.zrange(Keys.QUEUED, 0, -1) == [a.encode()] and r.zrange(Keys.RUNNING, 0, -1) == [b.encode()]


def test_finish_writes_everything_once_and_keeps_the_first_verdict(lc, r):
    job_id = _submit(lc)
    lc.start(job_id, worker_name())
    lc.save_seq(job_id, 7)
    ps = r.pubsub()
    ps.subscribe(Keys.celery_meta(job_id))
    ps.get_message(timeout=2)
    meta = lc.finish(job_id, JobState.FAILED, error="RuntimeError: boom")
    assert meta["seq"] == 8 and meta["state"] == "failed" and meta["reason"] == "RuntimeError: boom"
    doc = _meta(r, job_id)
    assert doc["status"] == "FAILURE" and doc["result"]["seq"] == 8 and doc["result"]["exc_type"] == "RuntimeError"
    published = ps.get_message(timeout=2)
    assert json.loads(published["data"]) == doc  # watchers got exactly what is stored
    rec = lc.record(job_id)
    assert (rec["state"], rec["seq"], rec["error"]) == ("failed", 8, "RuntimeError: boom")
    assert not r.exists(Keys.heartbeat(job_id)) and r.zrank(Keys.RUNNING, job_id) is None
    assert lc.announced == [(job_id, "task-failed", lc.announced[0][2])]

    assert lc.finish(job_id, JobState.SUCCEEDED, result={"frames": 1}) is None  # too late: failed stays
    assert lc.finish(job_id, JobState.CANCELLED, reason=Reason.CANCELLED) is None
    assert _meta(r, job_id)["status"] == "FAILURE" and len(lc.announced) == 1
    assert ps.get_message(timeout=0.5) is None  # nothing published either


def test_a_final_without_fields_keeps_the_sections_clients_saw(lc, r):
    job_id = _submit(lc)
    lc.start(job_id, worker_name())
    running = {"status": "PROGRESS", "result": {"v": 1, "seq": 3, "state": "running", "event": "section",
                                                "sections_done": [{"section": 1, "frames": 37, "seconds": 1.2,
                                                                   "file": "video-section-01.mp4"}],
                                                "progress": 0.5}}  # fmt: skip
    r.set(Keys.celery_meta(job_id), json.dumps(running))
    meta = lc.finish(job_id, JobState.CANCELLED, reason=Reason.TERMINATED.format(signum=15))
    assert meta["seq"] == 4 and meta["sections_done"][0]["section"] == 1 and meta["progress"] == 0.5
    assert "signal 15" in meta["reason"] and _meta(r, job_id)["status"] == "REVOKED"


def test_a_cancelled_queued_job_never_runs(lc):
    job_id = _submit(lc)
    lc.request_cancel(job_id)
    start = lc.start(job_id, worker_name())
    assert start.verdict == "ended" and start.record["state"] == "cancelled"
    assert start.record["reason"] == Reason.CANCELLED


def test_a_live_run_is_not_duplicated_but_a_dead_one_is_redelivered(lc, r):
    job_id = _submit(lc)
    assert lc.start(job_id, worker_name()).runs
    other_live = f"{socket.gethostname()}:{os.getppid()}"  # a process of this host that exists
    r.set(Keys.heartbeat(job_id), other_live)
    assert lc.start(job_id, "elsewhere:1").verdict == "duplicate"
    dead = subprocess.Popen(["true"])
    dead.wait()
    r.set(Keys.heartbeat(job_id), f"{socket.gethostname()}:{dead.pid}")  # its worker died
    again = lc.start(job_id, worker_name())
    assert again.runs and again.attempts == 2
    r.set(Keys.heartbeat(job_id), f"{socket.gethostname()}:{dead.pid}")
    exhausted = lc.start(job_id, worker_name())  # max_redeliveries 1: the third delivery fails it
    assert exhausted.verdict == "ended" and exhausted.record["state"] == "failed"
    assert exhausted.record["error"] == "worker lost (delivered 3 times)"


def test_reading_a_stalled_job_changes_nothing_the_sweep_ends_it(lc, r, settings):
    job_id = _submit(lc)
    lc.start(job_id, worker_name())
    r.delete(Keys.heartbeat(job_id))
    rec = lc.record(job_id)
    later = rec["started_at"] + settings.heartbeat_ttl + 1
    for _ in range(3):
        view = build_snapshot(lc.record(job_id), None, position=None, alive=False, heartbeat_ttl=settings.heartbeat_ttl,
                          now=later)  # fmt: skip
        assert isinstance(view, JobSnapshot) and view.state == "running" and view.stalled
    assert lc.record(job_id) == rec

    sweeper = Sweeper(lc, None, lambda _job_id: None)
    assert sweeper.sweep(now=rec["started_at"] + settings.stall_fail_seconds - 1)["stalled"] == []
    done = sweeper.sweep(now=rec["started_at"] + settings.stall_fail_seconds + 1)
    assert done["stalled"] == [job_id]
    rec = lc.record(job_id)
    assert rec["state"] == "failed" and rec["error"].startswith("worker lost (no heartbeat for")
    assert r.exists(Keys.cancel(job_id))  # a worker that wakes up stops at its next step


def test_the_sweep_cancels_jobs_purged_from_the_broker(lc, r, settings, monkeypatch):
    from tasks.celery_app import make_celery
    from tasks.protocol import QUEUE, TASK_NAME

    celery = make_celery(client=True)
    celery.conf.broker_url = settings.broker_url
    kept, purged = _submit(lc), _submit(lc)
    for job_id in (kept, purged):
        celery.send_task(TASK_NAME, args=[job_id, {}], task_id=job_id, queue=QUEUE)
    messages = r.lrange(QUEUE, 0, -1)
    assert len(messages) == 2
    r.delete(QUEUE)  # what `celery purge` does
    r.rpush(QUEUE, next(m for m in messages if kept.encode() in m))
    sweeper = Sweeper(lc, Broker(celery, inspect_timeout=0.2), lambda _job_id: None)
    now = time.time() + 60  # past the grace for fresh submissions
    assert sweeper.sweep(now=now)["purged"] == []  # missing once: maybe in flight
    assert sweeper.sweep(now=now + 1)["purged"] == [purged]
    assert lc.record(purged)["reason"] == Reason.PURGED and lc.record(kept)["state"] == "queued"
    assert r.zrange(Keys.QUEUED, 0, -1) == [kept.encode()]


def test_expired_jobs_leave_the_index_and_their_files_go(lc, r, settings):
    job_id = _submit(lc)
    removed: list[str] = []
    r.delete(Keys.job(job_id))  # the record expired (result_ttl)
    sweeper = Sweeper(lc, None, removed.append)
    assert sweeper.sweep(now=time.time() + settings.result_ttl + 1)["expired"] == [job_id]
    assert removed == [job_id] and r.zcard(Keys.JOBS) == 0
