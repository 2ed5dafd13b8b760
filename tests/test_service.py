"""The service end to end: real Valkey, real Celery worker, real gunicorn web tier."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from diffusers_helper.video import read_mp4
from tasks.protocol import MESSAGE_TYPES, Keys

from .conftest import png_bytes
from .wsclient import watch, watch_sse

pytestmark = pytest.mark.slow


def _wait(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _final_state(live, job_id: str, timeout: float = 90.0) -> dict:
    return _wait(lambda: (j := live.job(job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
                 timeout, f"job {job_id} to finish")  # fmt: skip


def _jpeg(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert img.format == "JPEG"
    return img


def test_submit_watch_and_download(live):
    job = live.submit(total_second_length=2, steps=4, seed=11)
    assert job["state"] == "queued" and job["links"]["ws"] == f"/ws/jobs/{job['id']}"
    w = watch(live.ws_base + job["links"]["ws"])
    w.join(90)
    assert w.error is None and w.messages[0]["type"] == "snapshot"
    assert {m["type"] for m in w.messages} == set(MESSAGE_TYPES)  # all four kinds, nothing else
    progress = w.of_type("progress")
    previews = [m for m in progress if m.get("preview")]
    assert previews, "no preview reached the socket"
    for m in previews:
        p = m["preview"]
        assert _jpeg(p["image"]).size == (p["frames"] * p["tile_width"], p["tile_height"])
    assert [m["sections_done"][-1]["section"] for m in w.of_type("section")] == [1, 2]
    (final,) = w.of_type("final")
    assert final["state"] == "succeeded" and final["result"]["frames"] == 73
    assert w.seqs() == list(range(w.seqs()[0], w.seqs()[-1] + 1))  # gap-free
    assert all(0 <= m["progress"] <= 1 for m in progress)

    url = live.base + final["result"]["video_url"]
    ranged = httpx.get(url, headers={"Range": "bytes=0-1023"})
    assert ranged.status_code == 206 and len(ranged.content) == 1024
    full = httpx.get(url)
    assert full.status_code == 200 and full.headers["content-type"] == "video/mp4"
    path = live.root / "dl.mp4"
    path.write_bytes(full.content)
    assert read_mp4(path).shape == (73, 64, 64, 3)
    section = httpx.get(live.base + final["sections_done"][0]["url"])
    assert section.status_code == 200 and section.content[4:8] == b"ftyp"
    assert httpx.get(f"{live.base}/api/jobs/{job['id']}/input").headers["content-type"] == "image/png"


def test_two_watchers_same_sequence_and_late_watcher_gets_sections(live):
    blocker = live.submit(total_second_length=2, steps=20)  # keeps the job queued while both connect
    job = live.submit(total_second_length=4, steps=12)
    url = live.ws_base + job["links"]["ws"]
    a, b, events = watch(url), watch(url), watch_sse(f"{live.base}/api/jobs/{job['id']}/events")
    _wait(lambda: len(a.messages) and len(b.messages) and len(events.messages), 10, "the snapshots")
    assert live.job(blocker["id"])["state"] == "running" and a.messages[0]["seq"] == b.messages[0]["seq"] == 0
    assert a.got_section.wait(60), "no section finished"
    late = watch(url)
    for w in (a, b, late, events):
        w.join(90)
    sa, sb = a.seqs(), b.seqs()
    assert len(sa) >= 3 and sa == sb
    assert sa == list(range(sa[0], sa[-1] + 1))
    # SSE: the same messages, each an event of its type with id = seq, and a clean end
    assert events.error is None and events.ended and events.messages == a.messages
    heads = [(f["event"], f.get("id")) for f in events.fields[1:]]
    assert heads == [(m["type"], str(m["seq"])) for m in a.messages[1:]]
    snap = late.messages[0]
    assert snap["type"] == "snapshot" and snap["job"]["state"] == "running"
    assert len(snap["job"]["sections_done"]) >= 1 and snap["job"]["preview"] is not None
    tail = late.seqs()
    assert tail[0] == snap["seq"] + 1 and tail == sa[sa.index(tail[0]) :]


def _commands(r) -> dict[str, int]:
    return {k: v["calls"] for k, v in r.info("commandstats").items()}


def _commands_per_update(live, watchers: int) -> tuple[float, dict[str, int]]:
    """Redis commands per worker update over a window in mid-job (no connects, no end), and
    the commands counted."""
    job = live.submit(total_second_length=4, steps=20)
    url = live.ws_base + job["links"]["ws"]
    ws = [watch(url) for _ in range(watchers)]
    assert all(w.first_update.wait(60) for w in ws)
    r = live.redis()

    def all_reached(seq: int) -> bool:
        return all(w.seqs() and w.seqs()[-1] >= seq for w in ws)

    k1 = max(w.seqs()[-1] for w in ws) + 2
    _wait(lambda: all_reached(k1), 60, f"seq {k1}")
    before = _commands(r)
    k2 = k1 + 12
    _wait(lambda: all_reached(k2), 60, f"seq {k2}")
    after = _commands(r)
    for w in ws:
        w.join(90)
    final = ws[0].seqs()[-1]
    for w in ws:  # each joined at its own snapshot, then saw every update to the end
        assert w.seqs() == list(range(w.messages[0]["seq"] + 1, final + 1)), "a watcher missed updates"
    delta = {k: after[k] - before.get(k, 0) for k in after if k != "cmdstat_info"}
    # every worker update is exactly one SETEX of the task meta: count updates by it
    return sum(delta.values()) / delta["cmdstat_setex"], {k[8:]: v for k, v in delta.items() if v}


def test_redis_work_per_update_does_not_grow_with_watchers(live):
    (one, seen_one), (twenty, seen_twenty) = _commands_per_update(live, 1), _commands_per_update(live, 20)
    print(f"redis commands per update: 1 watcher {one:.2f}, 20 watchers {twenty:.2f}")
    # The worker's writes (GET+SETEX+PUBLISH, the cancel check) are per update; heartbeats, the
    # sweep and the hub's poll of quiet channels are per second, so a slower window counts a few
    # more.  Anything done per watcher would add 19 or more per update.
    assert twenty < one + 5, (seen_one, seen_twenty)


def _raw_ws(base: str, path: str, extensions: str | None = None, rcvbuf: int | None = None):
    host, port = base.split("//")[1].split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    key = base64.b64encode(b"0123456789abcdef").decode()
    req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")  # fmt: skip
    if extensions:
        req += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    s.sendall((req + "\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    return s, head.decode()


def test_permessage_deflate_is_refused(live):
    job = live.submit()
    s, head = _raw_ws(live.base, f"/ws/jobs/{job['id']}", extensions="permessage-deflate; client_max_window_bits")
    s.close()
    assert head.startswith("HTTP/1.1 101")
    assert "sec-websocket-extensions" not in head.lower()


def test_a_stalled_watcher_costs_healthy_ones_nothing(live):
    dropped_before = httpx.get(live.base + "/api/info").json()["hub"]["dropped_previews"]
    job = live.submit(total_second_length=2, steps=60, resolution=128)
    stalled, _ = _raw_ws(live.base, f"/ws/jobs/{job['id']}", rcvbuf=4096)  # handshake, then never reads
    try:
        healthy = watch(live.ws_base + job["links"]["ws"])
        healthy.join(120)
        hub = httpx.get(live.base + "/api/info").json()["hub"]
    finally:
        stalled.close()
    seqs = healthy.seqs()
    assert healthy.of_type("final") and seqs == list(range(seqs[0], seqs[-1] + 1)) and len(seqs) > 100
    # the stalled socket really stalled: its pending previews were replaced, nobody else's
    assert hub["dropped_previews"] > dropped_before


def test_unknown_job_is_404_and_ws_closes_with_a_code(live):
    r = httpx.get(live.base + "/api/jobs/nope")
    assert r.status_code == 404 and "error" in r.json()
    w = watch(live.ws_base + "/ws/jobs/nope", timeout=10)
    w.join(15)
    assert w.closed is not None and w.closed[0] == 4404 and not w.messages


def test_queue_positions_and_cancel(live):
    blocker = live.submit(total_second_length=8, steps=30)
    bw = watch(live.ws_base + blocker["links"]["ws"])
    assert bw.got_section.wait(60)
    queued = [live.submit() for _ in range(3)]
    assert [live.job(j["id"])["position"] for j in queued] == [1, 2, 3]
    listing = httpx.get(live.base + "/api/jobs?limit=4").json()
    assert [j["id"] for j in listing["jobs"]] == [j["id"] for j in reversed(queued)] + [blocker["id"]]

    r = httpx.post(f"{live.base}/api/jobs/{queued[1]['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert live.job(queued[2]["id"])["position"] == 2

    r = httpx.post(f"{live.base}/api/jobs/{blocker['id']}/cancel")
    assert r.status_code == 202
    bw.join(60)
    (final,) = bw.of_type("final")
    assert final["state"] == "cancelled" and len(final["sections_done"]) >= 1
    kept = httpx.get(live.base + final["sections_done"][0]["url"])
    assert kept.status_code == 200
    assert httpx.get(f"{live.base}/api/jobs/{blocker['id']}/video").status_code == 409  # cancelled: no final video

    for j in (queued[0], queued[2]):
        assert _final_state(live, j["id"])["state"] == "succeeded"
    never = live.job(queued[1]["id"])
    assert never["state"] == "cancelled" and never["started_at"] is None and never["attempts"] == 0
    # Celery's STARTED (written when the worker dequeued it) did not bury the final
    raw = json.loads(live.redis().get(Keys.celery_meta(queued[1]["id"])))
    assert raw["status"] == "REVOKED" and raw["result"]["seq"] == never["seq"] == 1
    assert httpx.post(f"{live.base}/api/jobs/{queued[1]['id']}/cancel").status_code == 409
    assert httpx.delete(f"{live.base}/api/jobs/{queued[0]['id']}").status_code == 204
    assert httpx.get(f"{live.base}/api/jobs/{queued[0]['id']}").status_code == 404
    assert not (live.root / "results" / queued[0]["id"]).exists()


def test_readyz(live, tmp_path):
    assert httpx.get(live.base + "/readyz").json()["ready"] is True
    from webapp import create_app

    lonely = live.redis_url.rsplit("/", 1)[0] + "/5"  # same server, a database no worker writes to
    app = create_app({"REDIS_URL": lonely, "RESULTS_DIR": str(tmp_path)})
    r = app.test_client().get("/readyz")
    assert r.status_code == 503 and "no worker" in r.json["reason"]


def _bad(live, expect_status: int, field: str, data=None, files=None, json_body=None):
    r = live.redis()
    before = (r.zcard(Keys.JOBS), r.get(Keys.SUBMITTED))
    if json_body is not None:
        resp = httpx.post(live.base + "/api/jobs", json=json_body)
    else:
        resp = httpx.post(live.base + "/api/jobs", data=data or {}, files=files)
    assert resp.status_code == expect_status, resp.text
    body = resp.json()
    assert body["field"] == field, body
    assert (r.zcard(Keys.JOBS), r.get(Keys.SUBMITTED)) == before, "something was recorded"
    return body


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_get_4xx_naming_the_field_and_nothing_is_queued(live):
    img = {"image": ("in.png", png_bytes(), "image/png")}
    _bad(live, 400, "image", data={"prompt": "no image"})
    _bad(live, 422, "image", files={"image": ("x.png", b"this is not an image", "image/png")})
    _bad(live, 422, "image", files={"image": ("x.png", png_bytes()[:200], "image/png")})
    _bad(live, 422, "image", files={"image": ("x.png", _png(9000, 20), "image/png")})
    _bad(live, 413, "body", files={"image": ("x.bin", b"\0" * (3 * 2**20), "image/png")})
    _bad(live, 422, "steps", data={"steps": "500"}, files=img)
    _bad(live, 422, "steps", data={"steps": "many"}, files=img)
    _bad(live, 422, "cfg", data={"cfg": "0"}, files=img)
    _bad(live, 422, "end_image", data={"model": "framepack-f1"},
         files={**img, "end_image": ("e.png", png_bytes(), "image/png")})  # fmt: skip
    _bad(live, 422, "end_image", data={}, files={**img, "end_image": ("e.png", b"junk", "image/png")})
    _bad(live, 422, "image", json_body={"image": "%%% not base64"})
    body = _bad(live, 422, "total_second_length", json_body={
        "image": base64.b64encode(png_bytes()).decode(), "total_second_length": 500})  # fmt: skip
    assert "total_second_length" in body["error"]
    # the service still works afterwards
    ok = live.submit()
    assert _final_state(live, ok["id"])["state"] == "succeeded"


def test_json_submission_with_data_url(live):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    r = httpx.post(live.base + "/api/jobs", json={"image": data_url, "steps": 1, "total_second_length": 1, "seed": 3})
    assert r.status_code == 202
    done = _final_state(live, r.json()["id"])
    assert done["state"] == "succeeded" and done["result"]["seed"] == 3


def test_web_tier_holds_no_result_subscriptions(live):
    r = live.redis()
    ids = [live.submit(steps=1)["id"] for _ in range(5)]
    for i in ids:
        _final_state(live, i)
    channels = [c.decode() for c in r.pubsub_channels("celery-task-meta-*")]
    assert channels == []


def test_openapi_is_generated_from_the_schema(live):
    doc = httpx.get(live.base + "/api/openapi.json").json()
    props = doc["components"]["schemas"]["JobParams"]["properties"]
    assert props["steps"]["maximum"] == 100 and props["steps"]["default"] == 25
    assert "/api/jobs" in doc["paths"] and "/stream/status/{job_id}" in doc["paths"]


def test_info_says_which_profile_runs(live):
    info = httpx.get(live.base + "/api/info").json()
    assert info["profiles"] == ["tiny"] and info["is_noise"] is True


def test_the_job_worker_yields_the_cpu_to_the_web_tier(live):
    """FRAMEPACK_WORKER_NICE (10): the processes that run jobs, their torch threads
    included, are niced; the web tier is not."""
    import psutil

    worker = psutil.Process(live.workers[0].popen.pid)
    runners = [worker, *worker.children(recursive=True)]
    threads = [psutil.Process(t.id).nice() for p in runners for t in p.threads() if psutil.pid_exists(t.id)]
    assert {p.nice() for p in runners} == {10} and set(threads) == {10}
    assert psutil.Process(live.web.popen.pid).nice() == 0
    # each runs in a session of its own: with autogroup scheduling, nice only counts if the
    # worker's session is lowered too
    autogroup = Path(f"/proc/{worker.pid}/autogroup")
    if autogroup.exists():
        assert autogroup.read_text().split()[-1] == "10"
        assert Path(f"/proc/{live.web.popen.pid}/autogroup").read_text().split()[-1] == "0"


def test_webapp_never_imports_torch():
    code = "import sys, webapp; webapp.create_app(); sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_previews_decode_to_the_announced_strip(live):
    job = live.submit(total_second_length=1, steps=3, resolution=128)
    w = watch(live.ws_base + job["links"]["ws"])
    w.join(60)
    previews = [m["preview"] for m in w.of_type("progress") if m.get("preview")]
    assert previews
    p = previews[-1]
    img = np.asarray(_jpeg(p["image"]))
    assert img.shape == (p["tile_height"], p["frames"] * p["tile_width"], 3) == (16, 9 * 16, 3)


def test_all_jobs_feed(live):
    from .wsclient import Watcher

    feed = Watcher(live.ws_base + "/ws/jobs", timeout=30)
    feed.start()
    feed.connected.wait(10)
    _wait(lambda: feed.messages, 10, "feed snapshot")
    assert feed.messages[0]["type"] == "snapshot" and isinstance(feed.messages[0]["jobs"], list)
    job = live.submit()
    _final_state(live, job["id"])
    _wait(lambda: any(m.get("job_id") == job["id"] and m.get("state") == "succeeded" for m in feed.messages),
          10, "the finished event")  # fmt: skip
    mine = [m for m in feed.messages[1:] if m.get("job_id") == job["id"]]
    assert all(m["type"] == "job" for m in mine)
    assert [m["state"] for m in mine][0] == "queued" and mine[0]["event"] == "submitted"
    assert "running" in [m["state"] for m in mine]


def test_a_worker_without_weights_reports_why_and_fails_jobs_readably(live, tmp_path):
    """A profile directory with no weights: /readyz says why, a job fails with the reason."""
    from stack import Proc, free_port, stack_env, wait_http, web_command, worker_command

    redis_url = live.redis_url.rsplit("/", 1)[0] + "/4"
    empty = tmp_path / "no-weights"
    empty.mkdir()
    env = stack_env(redis_url, tmp_path / "results", {"FRAMEPACK_PROFILE": str(empty)})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        Proc(worker_command(hostname=f"noweights-{port}@%h"), env, tmp_path / "w.log", echo=False),
        Proc(web_command(port), env, tmp_path / "web.log", echo=False) as web,
    ):
        wait_http(base + "/healthz", 60, proc=web)
        reason = _wait(lambda: "not found" in (r := httpx.get(base + "/readyz").json())["reason"] and r, 60,
                       "the worker's load error")  # fmt: skip
        assert httpx.get(base + "/readyz").status_code == 503
        assert "model weights not found" in reason["reason"] and str(empty) in reason["reason"]
        r = httpx.post(base + "/api/jobs", files={"image": ("in.png", png_bytes(), "image/png")})
        job_id = r.json()["id"]
        done = _wait(lambda: (j := httpx.get(f"{base}/api/jobs/{job_id}").json())["state"] == "failed" and j, 60,
                     "the job to fail")  # fmt: skip
        assert "model weights not found" in done["error"]


def test_flower_sees_progress_in_result_then_the_end(live):
    """Flower learns of jobs from events only.  Progress is re-announced as task-started with a
    readable Result (a custom PROGRESS state would outrank REVOKED and hide every cancel), the
    end as the standard task-succeeded; celery.events.state.State is what Flower runs."""
    import threading

    from celery import Celery
    from celery.events.state import State

    app = Celery(broker=live.redis_url)
    seen: list[dict] = []
    with app.connection() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        t = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        t.start()
        time.sleep(1.0)  # the receiver's queue is bound
        job = live.submit(total_second_length=4, steps=12)
        _final_state(live, job["id"])
        _wait(lambda: any(e["type"] == "task-succeeded" and e.get("uuid") == job["id"] for e in seen), 15,
              "task-succeeded")  # fmt: skip
        receiver.should_stop = True
    mine = [e for e in seen if e.get("uuid") == job["id"]]
    progress = [e for e in mine if e["type"] == "task-started" and "%" in (e.get("result") or "")]
    assert len(progress) >= 2, [e["type"] for e in mine]
    percents = [int(e["result"].split("%")[0]) for e in progress]
    assert percents == sorted(percents) and percents[-1] > 0
    assert all("data:image" not in e["result"] for e in progress)  # never the preview
    state = State()
    for e in mine:
        state.event(e)
        if e is progress[0]:
            assert state.tasks[job["id"]].state == "STARTED" and "%" in state.tasks[job["id"]].result
    task = state.tasks[job["id"]]
    frames = live.job(job["id"])["result"]["frames"]
    assert task.state == "SUCCESS" and task.result.startswith(f"'{frames} frames")  # the summary, as repr
    assert task.started == pytest.approx(live.job(job["id"])["started_at"], abs=1.0)


def _read_frames(sock, until_final: bool = True, timeout: float = 90.0) -> list[tuple[int, bytes]]:
    """Parse server frames (unmasked) from a raw socket until a text frame of type final."""
    sock.settimeout(timeout)
    buf, frames = b"", []

    def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(1 << 16)
            assert chunk, "connection closed early"
            buf += chunk

    while True:
        need(2)
        opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
        assert buf[0] & 0x80 and not buf[1] & 0x80, "fragmented or masked server frame"
        head = 2
        if length == 126:
            need(4)
            length, head = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            need(10)
            length, head = int.from_bytes(buf[2:10], "big"), 10
        need(head + length)
        payload, buf = buf[head : head + length], buf[head + length :]
        frames.append((opcode, payload))
        if opcode == 8 or (until_final and opcode == 1 and payload.startswith(b'{"type":"final"')):
            return frames


def test_client_pings_during_congestion_never_split_a_frame(live):
    """simple-websocket answers pings from its own thread; those pongs must never land inside a
    frame that a congested socket is still taking."""
    job = live.submit(total_second_length=2, steps=60, resolution=128)
    sock, head = _raw_ws(live.base, f"/ws/jobs/{job['id']}", rcvbuf=4096)
    assert head.startswith("HTTP/1.1 101")
    mask = b"\x01\x02\x03\x04"
    ping = bytes((0x89, 0x81)) + mask + bytes((ord("p") ^ mask[0],))
    for _ in range(40):  # ping while not reading: the server's writes back up meanwhile
        sock.sendall(ping)
        time.sleep(0.05)
    frames = _read_frames(sock)
    sock.close()
    opcodes = {op for op, _ in frames}
    assert opcodes <= {1, 9, 10, 8} and 10 in opcodes  # text, ping, pong (answered), close
    texts = [json.loads(p) for op, p in frames if op == 1]  # every text frame is whole JSON
    assert texts[0]["type"] == "snapshot" and texts[-1]["type"] == "final"
    seqs = [m["seq"] for m in texts[1:]]
    assert seqs == sorted(seqs)
