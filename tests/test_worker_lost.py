"""A job whose worker process dies is redelivered once, then fails as "worker lost".

Kills the pool child of the live stack's worker (SIGKILL, as the OOM killer would); Celery's
parent requeues the job (late ack + reject_on_worker_lost) and forks a fresh child.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .wsclient import watch

pytestmark = pytest.mark.slow


def _running_on(live, job_id: str, attempt: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = live.job(job_id)
        if job["state"] == "running" and job["attempts"] == attempt and job["step"]:
            rec = live.redis().hget(f"fp:job:{job_id}", "worker").decode()
            return int(rec.rsplit(":", 1)[1])
        time.sleep(0.05)
    raise AssertionError(f"job not running its attempt {attempt}: {live.job(job_id)}")


def test_lost_worker_redelivers_once_then_fails(live):
    job = live.submit(total_second_length=6, steps=40)
    w = watch(live.ws_base + job["links"]["ws"], timeout=180)
    os.kill(_running_on(live, job["id"], 1), signal.SIGKILL)
    os.kill(_running_on(live, job["id"], 2), signal.SIGKILL)
    w.join(180)
    (final,) = w.of_type("final")
    assert final["state"] == "failed" and "worker lost" in final["error"]
    seqs = w.seqs()
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "the redelivered run broke the sequence"
    assert live.job(job["id"])["attempts"] == 3
    # the worker is back: the next job runs
    nxt = live.submit()
    w2 = watch(live.ws_base + nxt["links"]["ws"])
    w2.join(120)
    assert w2.of_type("final")[0]["state"] == "succeeded"


def test_frozen_worker_shows_stalled_then_fails_and_keeps_that_verdict(live):
    """Stalled is shown by the live web tier (a read that changes nothing); the failure after
    FRAMEPACK_STALL_FAIL_SECONDS comes from the sweep, run here with a 5 s limit, so the live
    stack keeps the production limit that lets a redelivered job start in peace."""
    import dataclasses

    from tasks.lifecycle import Lifecycle
    from tasks.settings import Settings, connect
    from tasks.sweeper import Sweeper

    settings = dataclasses.replace(Settings.from_env(live.env), stall_fail_seconds=5.0)
    sweeper = Sweeper(Lifecycle(connect(live.redis_url, 5), settings), None, lambda _job_id: None)
    job = live.submit(total_second_length=6, steps=40)
    pid = _running_on(live, job["id"], 1)
    os.kill(pid, signal.SIGSTOP)  # frozen: no heartbeat, no progress
    try:
        deadline = time.monotonic() + 15
        while not (view := live.job(job["id"]))["stalled"]:
            assert time.monotonic() < deadline, "never shown as stalled"
            time.sleep(0.1)
        assert view["state"] == "running"
        deadline = time.monotonic() + 30
        while job["id"] not in sweeper.sweep()["stalled"]:
            assert time.monotonic() < deadline, f"a frozen job stayed {live.job(job['id'])['state']}"
            time.sleep(0.2)
        view = live.job(job["id"])
        assert view["state"] == "failed" and "worker lost" in view["error"] and view["reason"] == view["error"]
    finally:
        os.kill(pid, signal.SIGCONT)
    # the worker wakes up, stops at its next step (cancel flag) and leaves the verdict alone
    nxt = live.submit()
    w = watch(live.ws_base + nxt["links"]["ws"])
    w.join(120)
    assert w.of_type("final")[0]["state"] == "succeeded"
    assert live.job(job["id"])["state"] == "failed"
