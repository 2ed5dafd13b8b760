"""Webhooks without a worker (fast lane): the allow-list, what the lifecycle logs, and the
deliverer against a real receiver on loopback (signatures, order, back-off, giving up)."""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis
from standardwebhooks import Webhook

from tasks.lifecycle import Lifecycle, new_job_id, worker_name
from tasks.protocol import JobState, Keys, make_meta
from tasks.settings import Settings
from tasks.snapshot import JobSnapshot, build_snapshot
from tasks.sweeper import Sweeper
from tasks.webhooks import RECOVER_AFTER, Deliverer, WebhookRefused, check_url, deliveries

from .conftest import WEBHOOK_SECRET as SECRET
from .receiver import Receiver

ALL = ["start", "section", "completed"]


@pytest.mark.parametrize("url", ["https://hooks.example.com/x", "https://HOOKS.example.com/x?y=1",
                                 "https://hooks.example.com", "http://127.0.0.1:8123/hook/a"])  # fmt: skip
def test_allowed_urls(url):
    check_url(url, ("https://hooks.example.com", "http://127.0.0.1:8123/hook"))


@pytest.mark.parametrize("url", ["https://hooks.example.com.evil.net/", "https://hooks.example.com:444/",
                                 "http://hooks.example.com/", "http://127.0.0.1:8124/hook", "http://127.0.0.1:8123/",
                                 "http://u:p@127.0.0.1:8123/hook", "ftp://hooks.example.com/", "hooks.example.com/",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1/",
                                 "http://127.0.0.1:8123/hook/../../internal-dotdot", "https://hooks.example.com/fp/../../x",
                                 "http://127.0.0.1:8123/hook/%2e%2e/x", "http://127.0.0.1:8123/hook/%2E%2E%2Fx",
                                 "http://127.0.0.1:8123/hook/./x", "http://127.0.0.1:8123/hook\\..\\x",
                                 "http://127.0.0.1:8123/hook%5c..%5cx"])  # fmt: skip
def test_refused_urls_name_the_field(url):
    with pytest.raises(WebhookRefused) as exc:
        check_url(url, ("https://hooks.example.com", "http://127.0.0.1:8123/hook"))
    assert exc.value.field == "webhook" and exc.value.message.startswith("webhook: ")


def test_no_allow_list_refuses_every_webhook():
    with pytest.raises(WebhookRefused, match="FRAMEPACK_WEBHOOK_ALLOW"):
        check_url("https://hooks.example.com/", ())


def test_settings_want_a_secret_with_an_allow_list():
    with pytest.raises(ValueError, match="FRAMEPACK_WEBHOOK_SECRET"):
        Settings.from_env({"FRAMEPACK_WEBHOOK_ALLOW": "https://hooks.example.com/"})
    with pytest.raises(ValueError, match="FRAMEPACK_WEBHOOK_SECRET"):
        Settings.from_env({"FRAMEPACK_WEBHOOK_ALLOW": "https://h/", "FRAMEPACK_WEBHOOK_SECRET": "whsec_c2hvcnQ="})
    with pytest.raises(ValueError, match="FRAMEPACK_WEBHOOK_ALLOW"):
        Settings.from_env({"FRAMEPACK_WEBHOOK_ALLOW": "hooks.example.com", "FRAMEPACK_WEBHOOK_SECRET": SECRET})
    s = Settings.from_env({"FRAMEPACK_WEBHOOK_ALLOW": "https://a/, https://b/x", "FRAMEPACK_WEBHOOK_SECRET": SECRET})
    assert s.webhook_allow == ("https://a/", "https://b/x")
    assert SECRET not in json.dumps(s.public()) and s.public()["webhook_secret"] == "***"


class Dispatched(list):
    """A ``dispatch`` that records (job_id, countdown) instead of sending a Celery task."""

    def __call__(self, job_id: str, countdown: float) -> None:
        self.append((job_id, countdown))


@pytest.fixture
def r(valkey_url):
    return redis.Redis.from_url(valkey_url)


@pytest.fixture
def lc(r, settings):
    return Lifecycle(r, settings, None, Dispatched())


def _job(lc: Lifecycle, url: str | None, events: list[str]) -> str:
    job_id = new_job_id()
    hook = {"url": url, "events": events} if url else None
    lc.submit(job_id, {"prompt": "p", "seed": 1}, "tiny", b"png", None, owner="ann", webhook=hook)
    return job_id


def _run_through(lc: Lifecycle, job_id: str, sections: int = 2) -> None:
    """What a worker does: start, write section updates, finish."""
    assert lc.start(job_id, worker_name()).runs
    done: list[dict] = []
    for k in range(1, sections + 1):
        done.append({"section": k, "frames": 37 * k, "seconds": 1.2 * k, "file": f"video-section-{k:02d}.mp4"})
        meta = make_meta(k, JobState.RUNNING, event="section", sections_done=list(done), section=k, sections=sections,
                         preview={"image": "data:image/jpeg;base64,AAAA", "frames": 1, "tile_width": 1,
                                  "tile_height": 1})  # fmt: skip
        lc.webhook_event(job_id, "section", meta)
    lc.finish(job_id, JobState.SUCCEEDED, result={"frames": 73, "seconds": 2.4}, fields={"sections_done": done})


def _log(r, job_id: str) -> list[dict]:
    return [json.loads(e) for e in r.lrange(Keys.webhook_log(job_id), 0, -1)]


def test_each_transition_logs_its_event_once_without_the_preview(lc, r):
    job_id = _job(lc, "http://127.0.0.1:9/hook", ALL)
    _run_through(lc, job_id)
    assert lc.finish(job_id, JobState.FAILED, error="late") is None  # a second end logs nothing
    log = _log(r, job_id)
    assert [e["event"] for e in log] == ["start", "section", "section", "completed"]
    assert len({e["id"] for e in log}) == 4 and all(e["state"] == "pending" for e in log)
    bodies = [json.loads(e["payload"]) for e in log]
    assert [b["type"] for b in bodies] == ["job.start", "job.section", "job.section", "job.completed"]
    assert [b["data"]["state"] for b in bodies] == ["running", "running", "running", "succeeded"]
    assert [len(b["data"]["sections_done"]) for b in bodies] == [0, 1, 2, 2]
    assert all("preview" not in b["data"] and "webhook" not in b["data"] for b in bodies)
    JobSnapshot.model_validate({**bodies[-1]["data"], "preview": None, "webhook": None})  # the snapshot's shape
    assert bodies[-1]["data"]["owner"] == "ann" and bodies[-1]["data"]["result"]["frames"] == 73
    assert lc.dispatch == [(job_id, 0.0)] * 4


def test_only_the_events_asked_for_and_none_without_a_webhook(lc, r):
    default = _job(lc, "http://127.0.0.1:9/hook", ["completed"])
    silent = _job(lc, None, [])
    _run_through(lc, default)
    _run_through(lc, silent)
    assert [e["event"] for e in _log(r, default)] == ["completed"]
    assert _log(r, silent) == [] and lc.dispatch == [(default, 0.0)]


def test_a_cancel_while_queued_is_a_completed_event(lc, r):
    job_id = _job(lc, "http://127.0.0.1:9/hook", ["start", "completed"])
    lc.finish(job_id, JobState.CANCELLED, reason="cancelled by user")
    (entry,) = _log(r, job_id)
    assert json.loads(entry["payload"])["data"]["state"] == "cancelled"


def _deliver_all(deliverer: Deliverer, job_id: str, timeout: float = 20) -> list[str]:
    """Run the deliverer as its scheduled tasks would (each when due) until nothing is pending."""
    outcomes, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcomes.append(deliverer.run(job_id))
        if outcomes[-1] == "done":
            return outcomes
        due = next((e["next_at"] for e in _log(deliverer.r, job_id) if e["state"] == "pending"), time.time())
        time.sleep(max(0.0, min(due - time.time(), deadline - time.monotonic())))
    raise AssertionError(f"deliveries not done: {outcomes}")


def test_deliveries_arrive_in_order_signed_and_after_two_failures(lc, r):
    with Receiver(fail={"job.start": 2}) as rx:
        job_id = _job(lc, rx.url, ALL)
        _run_through(lc, job_id)
        dispatched = Dispatched()
        deliverer = Deliverer(r, SECRET, backoff=0.1, retry_seconds=60, dispatch=dispatched)
        outcomes = _deliver_all(deliverer, job_id)
    assert outcomes == ["retrying", "retrying", "done"]
    assert [c for _, c in dispatched] == [0.1, 0.2]  # exponential back-off
    assert [q["type"] for q in rx.requests] == ["job.start"] * 3 + ["job.section"] * 2 + ["job.completed"]
    assert [q["answered"] for q in rx.requests] == [500, 500] + [204] * 4
    starts = rx.requests[:3]
    assert len({q["headers"]["webhook-id"] for q in starts}) == 1  # the same message, retried
    assert starts[2]["at"] - starts[1]["at"] >= 0.2 and starts[1]["at"] - starts[0]["at"] >= 0.1
    for q in rx.delivered():
        assert rx.verify(SECRET, q)["data"]["id"] == job_id
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"another-secret-of-32-bytes-long!").decode()).verify(
            rx.requests[-1]["body"], rx.requests[-1]["headers"])  # fmt: skip
    log = deliveries(r.lrange(Keys.webhook_log(job_id), 0, -1))
    assert [d["state"] for d in log] == ["delivered"] * 4
    assert [a["status"] for a in log[0]["attempts"]] == [500, 500, 204] and log[0]["attempts"][0]["error"] == "HTTP 500"
    assert not r.zscore(Keys.WEBHOOKS_DUE, job_id)  # nothing left to deliver


def test_the_snapshot_shows_every_attempt(lc, r, settings):
    with Receiver(fail={"job.completed": 1}) as rx:
        job_id = _job(lc, rx.url, ["completed"])
        _run_through(lc, job_id, sections=1)
        assert Deliverer(r, SECRET, 0.05, 60, Dispatched()).run(job_id) == "retrying"
    view = build_snapshot(lc.record(job_id), None, position=None, alive=False, heartbeat_ttl=3,
                      deliveries=deliveries(r.lrange(Keys.webhook_log(job_id), 0, -1)))  # fmt: skip
    hook = JobSnapshot.model_validate(view).webhook
    assert hook.url == rx.url and hook.events == ["completed"]
    (delivery,) = hook.deliveries
    assert delivery.state == "pending" and delivery.attempts[0].status == 500 and delivery.next_at > time.time() - 1


def test_gives_up_after_its_time_and_410_then_moves_on(lc, r):
    with Receiver(fail={"job.start": 99}) as rx:
        job_id = _job(lc, rx.url, ALL)
        _run_through(lc, job_id, sections=1)
        outcomes = _deliver_all(Deliverer(r, SECRET, backoff=0.1, retry_seconds=0.25, dispatch=Dispatched()), job_id)
    log = deliveries(r.lrange(Keys.webhook_log(job_id), 0, -1))
    assert [d["state"] for d in log] == ["failed", "delivered", "delivered"]
    assert 2 <= len(log[0]["attempts"]) <= 3 and outcomes[-1] == "done"
    assert [q["type"] for q in rx.delivered()] == ["job.section", "job.completed"]  # the rest still in order


def test_a_busy_job_is_left_to_the_process_delivering_it(lc, r):
    job_id = _job(lc, "http://127.0.0.1:9/hook", ["completed"])
    r.set(Keys.webhook_lock(job_id), "someone", ex=60)
    assert Deliverer(r, SECRET, 0.1, 60, Dispatched()).run(job_id) == "busy"


def test_the_sweep_resends_a_lost_delivery_task(lc, r, settings):
    job_id = _job(lc, "http://127.0.0.1:9/hook", ["completed"])
    lc.finish(job_id, JobState.CANCELLED, reason="cancelled by user")
    lc.dispatch.clear()
    sweeper = Sweeper(lc, None, lambda job_id: None)
    assert sweeper.sweep()["webhooks"] == []  # just due: its task is on its way
    assert sweeper.sweep(now=time.time() + RECOVER_AFTER + 1)["webhooks"] == [job_id]
    assert lc.dispatch == [(job_id, 0.0)]
    assert sweeper.sweep(now=time.time() + RECOVER_AFTER + 2)["webhooks"] == []  # not again at once


def test_deleting_a_job_forgets_its_deliveries(lc, r, settings):
    job_id = _job(lc, "http://127.0.0.1:9/hook", ["completed"])
    lc.finish(job_id, JobState.CANCELLED, reason="cancelled by user")
    lc.delete(job_id)
    assert not r.exists(Keys.webhook_log(job_id)) and r.zscore(Keys.WEBHOOKS_DUE, job_id) is None
    assert Deliverer(r, SECRET, 0.1, 60, Dispatched()).run(job_id) == "gone"

