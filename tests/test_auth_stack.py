"""Real users on the real stack: API tokens, ownership, the queue limit and signed webhooks.

The ``secured`` stack (conftest): Valkey, the GPU worker, the webhooks worker and gunicorn,
started with three tokens (two users, one admin), a queued-jobs limit of 2 and webhooks
allowed to one loopback receiver (a real little HTTP server in the test, which can fail on
purpose)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import simple_websocket

from framepack_client import APIError, FramePackClient
from stack import ROOT

from .conftest import ADMIN, ANN, BOB, bearer, png_bytes
from .conftest import WEBHOOK_SECRET as SECRET
from .receiver import Receiver
from .wsclient import Watcher

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")
LONG = {"total_second_length": "10", "steps": "60"}  # ~20 s on the tiny profile: keeps the worker busy


def submit(stack, token: str | None, expect: int = 202, **fields) -> dict:
    data = {"total_second_length": "1", "steps": "2", **fields}
    r = httpx.post(stack.base + "/api/jobs", files={"image": ("in.png", png_bytes(), "image/png")}, data=data,
                   headers=bearer(token) if token else {})  # fmt: skip
    assert r.status_code == expect, r.text
    return r.json()


def job(stack, token: str, job_id: str) -> httpx.Response:
    return httpx.get(f"{stack.base}/api/jobs/{job_id}", headers=bearer(token), timeout=30)


def ended(stack, token: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = job(stack, token, job_id).json()
        if view["state"] in TERMINAL:
            return view
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


def ticket(stack, token: str) -> str:
    return httpx.post(stack.base + "/api/access", headers=bearer(token)).json()["access"]


def ws_status(url: str, headers: dict | None = None) -> int | None:
    """The HTTP status a WebSocket handshake was refused with (None: it was accepted)."""
    try:
        ws = simple_websocket.Client.connect(url, headers=headers)
    except simple_websocket.ConnectionError as exc:
        return exc.status_code
    ws.close()
    return None


class Feed(Watcher):
    """The all-jobs feed (``/ws/jobs``), recorded until stopped."""

    def __init__(self, url: str):
        super().__init__(url, timeout=120)
        self.stop = threading.Event()

    def run(self) -> None:
        ws = simple_websocket.Client.connect(self.url)
        self.connected.set()
        try:
            while not self.stop.is_set():
                raw = ws.receive(timeout=0.2)
                if raw is not None:
                    self.messages.append(json.loads(raw))
        finally:
            ws.close()


def test_no_token_is_401_on_rest_websocket_and_sse(secured):
    mine = submit(secured, ANN)
    for path in ("/api/jobs", f"/api/jobs/{mine['id']}", "/api/info", "/queue", f"/status/{mine['id']}"):
        r = httpx.get(secured.base + path)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert r.json()["field"] == "authorization"
    assert httpx.get(secured.base + "/api/jobs", headers=bearer("wrong")).status_code == 401
    with httpx.stream("GET", f"{secured.base}/stream/status/{mine['id']}") as sse:
        assert sse.status_code == 401
    for path in (f"/ws/jobs/{mine['id']}", "/ws/jobs"):
        assert ws_status(secured.ws_base + path) == 401
        assert ws_status(secured.ws_base + path, bearer("wrong")) == 401
        assert ws_status(secured.ws_base + path, bearer(ANN)) is None  # clients that can set headers
    assert httpx.get(secured.base + "/healthz").status_code == 200 and httpx.get(secured.base + "/").status_code == 200

    # browsers: a short-lived ticket from POST /api/access, on the WebSocket and the EventSource URL
    access = ticket(secured, ANN)
    w = Watcher(f"{secured.ws_base}/ws/jobs/{mine['id']}?access={access}")
    w.start()
    events: list[str] = []
    with httpx.stream("GET", f"{secured.base}/stream/status/{mine['id']}?access={access}", timeout=120) as sse:
        assert sse.status_code == 200
        for line in sse.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
    w.join(120)
    assert events[-1] == "status" and w.of_type("final")[0]["state"] == "succeeded"
    assert httpx.post(f"{secured.base}/api/jobs/{mine['id']}/cancel?access={access}").status_code == 401  # reads only


def test_users_cannot_see_watch_cancel_or_delete_each_others_jobs_but_an_admin_can(secured):
    ann_feed = Feed(f"{secured.ws_base}/ws/jobs?access={ticket(secured, ANN)}")
    root_feed = Feed(f"{secured.ws_base}/ws/jobs?access={ticket(secured, ADMIN)}")
    for feed in (ann_feed, root_feed):
        feed.start()
        feed.connected.wait(10)
    bobs = submit(secured, BOB)
    anns = submit(secured, ANN)
    ended(secured, BOB, bobs["id"])
    ended(secured, ANN, anns["id"])
    b = bobs["id"]

    assert job(secured, ANN, b).status_code == 404
    for path in (f"/api/jobs/{b}/video", f"/api/jobs/{b}/input", f"/status/{b}", f"/result/{b}",
                 f"/download/video/{b}"):  # fmt: skip
        assert httpx.get(secured.base + path, headers=bearer(ANN)).status_code == 404, path
    sse = httpx.get(f"{secured.base}/stream/status/{b}", headers=bearer(ANN), timeout=10)  # as the original: ends
    assert "Job not found" in sse.text and "completed" not in sse.text  # at once, one status event, nothing of b
    peek = Watcher(f"{secured.ws_base}/ws/jobs/{b}?access={ticket(secured, ANN)}")
    peek.run()
    assert peek.messages == [] and peek.closed[0] == 4404  # as if it did not exist
    assert httpx.post(f"{secured.base}/api/jobs/{b}/cancel", headers=bearer(ANN)).status_code == 404
    assert httpx.delete(f"{secured.base}/api/jobs/{b}", headers=bearer(ANN)).status_code == 404
    listed = httpx.get(secured.base + "/api/jobs?limit=200", headers=bearer(ANN)).json()["jobs"]
    assert anns["id"] in {j["id"] for j in listed} and b not in {j["id"] for j in listed}

    # the admin sees both, watches bob's, deletes it
    assert job(secured, ADMIN, b).json()["owner"] == "bob"
    admin_watch = Watcher(f"{secured.ws_base}/ws/jobs/{b}?access={ticket(secured, ADMIN)}")
    admin_watch.run()
    assert [m["type"] for m in admin_watch.messages] == ["snapshot", "final"]
    assert httpx.delete(f"{secured.base}/api/jobs/{b}", headers=bearer(ADMIN)).status_code == 204
    assert job(secured, BOB, b).status_code == 404

    for feed in (ann_feed, root_feed):
        feed.stop.set()
        feed.join(10)
    seen = lambda feed: {m.get("job_id") for m in feed.messages if m["type"] == "job"}  # noqa: E731
    assert anns["id"] in seen(ann_feed) and b not in seen(ann_feed)  # a user's feed: its own jobs only
    assert all(j["owner"] == "ann" for j in ann_feed.messages[0]["jobs"])  # its snapshot too
    assert {anns["id"], b} <= seen(root_feed)


def test_over_the_queued_limit_is_429_with_retry_after(secured):
    busy = submit(secured, ADMIN, **LONG)
    queued = [submit(secured, ANN), submit(secured, ANN)]
    total = lambda: httpx.get(secured.base + "/api/jobs", headers=bearer(ANN)).json()["total"]  # noqa: E731
    try:
        before = total()
        r = httpx.post(secured.base + "/api/jobs", files={"image": ("in.png", png_bytes(), "image/png")},
                       data={"total_second_length": "1", "steps": "2"}, headers=bearer(ANN))  # fmt: skip
        assert r.status_code == 429 and r.json()["field"] == "queue" and int(r.headers["Retry-After"]) > 0
        assert total() == before  # nothing stored
        submit(secured, BOB)  # bob has his own two places
    finally:
        for j in queued:
            httpx.post(f"{secured.base}/api/jobs/{j['id']}/cancel", headers=bearer(ANN))
        httpx.post(f"{secured.base}/api/jobs/{busy['id']}/cancel", headers=bearer(ADMIN))
        ended(secured, ADMIN, busy["id"])
    assert submit(secured, ANN)["state"] == "queued"  # places freed by the cancels


def test_webhooks_arrive_in_order_signed_and_after_two_failures(secured):
    with Receiver(port=secured.hook_port, fail={"job.start": 2}) as rx:
        j = submit(secured, ANN, total_second_length="2", webhook=rx.url,
                   webhook_events=["start", "section", "completed"])  # fmt: skip
        done = lambda reqs: any(q["type"] == "job.completed" and q["answered"] < 300 for q in reqs)  # noqa: E731
        requests = rx.wait_for(done, 120, "the completed event")
    final = ended(secured, ANN, j["id"])
    assert final["state"] == "succeeded" and len(final["sections_done"]) == 2
    assert [(q["type"], q["answered"]) for q in requests] == [
        ("job.start", 500), ("job.start", 500), ("job.start", 204),
        ("job.section", 204), ("job.section", 204), ("job.completed", 204)]  # fmt: skip
    payloads = [rx.verify(SECRET, q) for q in rx.delivered()]  # raises on a bad signature
    assert [p["data"]["state"] for p in payloads] == ["running", "running", "running", "succeeded"]
    assert [len(p["data"]["sections_done"]) for p in payloads] == [0, 1, 2, 2]
    assert all(p["data"]["id"] == j["id"] and p["data"]["owner"] == "ann" and "preview" not in p["data"]
               for p in payloads)  # fmt: skip
    assert payloads[-1]["data"]["result"]["frames"] == final["result"]["frames"]
    assert len({q["headers"]["webhook-id"] for q in requests[:3]}) == 1  # one message, retried

    # the attempts, in the snapshot
    deliveries = job(secured, ANN, j["id"]).json()["webhook"]["deliveries"]
    assert [(d["event"], d["state"]) for d in deliveries] == [("start", "delivered"), ("section", "delivered"),
                                                             ("section", "delivered"), ("completed", "delivered")]
    assert [a["status"] for a in deliveries[0]["attempts"]] == [500, 500, 204]


def test_a_webhook_outside_the_allow_list_is_refused_at_submit(secured):
    before = httpx.get(secured.base + "/api/jobs", headers=bearer(BOB)).json()["total"]
    for url in (f"http://127.0.0.1:{secured.hook_port}/other", "http://127.0.0.1:6379/", "http://10.0.0.1/hook"):
        body = submit(secured, BOB, expect=400, webhook=url)
        assert body["field"] == "webhook" and "only calls URLs starting with" in body["error"]
    assert httpx.get(secured.base + "/api/jobs", headers=bearer(BOB)).json()["total"] == before


def test_client_and_command_line_with_a_token(secured, tmp_path):
    with FramePackClient(secured.base, token="") as anonymous:
        with pytest.raises(APIError) as exc:
            anonymous.jobs()
        assert exc.value.status == 401
        with pytest.raises(APIError) as exc:
            list(anonymous.watch("whatever"))
        assert exc.value.status == 401  # not retried forever
    with Receiver(port=secured.hook_port) as rx:
        (tmp_path / "in.png").write_bytes(png_bytes())
        out = tmp_path / "cli.mp4"
        env = {"PATH": "/usr/bin:/bin", "FRAMEPACK_TOKEN": BOB}
        proc = subprocess.run(
            [sys.executable, "-m", "framepack_client.cli", "--server", secured.base, "submit", str(tmp_path / "in.png"),
             "--set", "total_second_length=1", "--set", "steps=2", "--webhook", rx.url, "-o", str(out)],
            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 0
        (request,) = rx.wait_for(lambda reqs: len(reqs) >= 1, 60, "the completed event")
        assert rx.verify(SECRET, request)["data"]["owner"] == "bob"
    with FramePackClient(secured.base, token=BOB) as client:
        assert client.jobs()["jobs"][0]["owner"] == "bob"
