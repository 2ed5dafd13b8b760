"""No single client can stall the web tier: uploads that cost seconds of CPU to decode run off
the event loop (issue 20), against the real gevent server."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter

import httpx
import pytest

from .conftest import running_stack
from .wsclient import watch

pytestmark = pytest.mark.slow


def zeros_png16(side: int) -> bytes:
    """A ``side`` x ``side`` 16-bit RGBA PNG of zeros: ~100 KB that decode to side² x 8 bytes
    (the attack: cheap to send, expensive to decode; inside the pixel limits)."""
    row = b"\x00" * (1 + side * 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_eight_pathological_pngs_do_not_stall_the_web_tier(tmp_path, tiny_dir):
    bomb = zeros_png16(5000)
    with running_stack(tmp_path, tiny_dir, {"FRAMEPACK_MAX_QUEUE": "0"}) as live:
        httpx.get(live.base + "/healthz").raise_for_status()
        job = live.submit(total_second_length=6, steps=100, seed=1, use_teacache=False)  # watched meanwhile
        w = watch(live.ws_base + job["links"]["ws"], timeout=240)
        while not live.job(job["id"])["step"]:
            time.sleep(0.05)
        uploads: list[float] = []
        window = [time.time()]

        def upload() -> None:
            t = time.monotonic()
            resp = httpx.post(live.base + "/api/jobs", files={"image": ("bomb.png", bomb, "image/png")},
                              data={"steps": "1", "total_second_length": "1"}, timeout=120)  # fmt: skip
            assert resp.status_code == 202, resp.text
            uploads.append(time.monotonic() - t)

        threads = [threading.Thread(target=upload) for _ in range(8)]
        for th in threads:
            th.start()
        latencies = []
        with httpx.Client(base_url=live.base, timeout=10) as probe:
            while any(th.is_alive() for th in threads):
                t = time.monotonic()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - t)
                time.sleep(0.02)
        for th in threads:
            th.join()
        window.append(time.time())
        assert len(uploads) == 8 and max(uploads) > 1.0  # the decodes really took time...
        # the watcher's updates kept arriving: their delay from the worker's emit to the socket
        delays = sorted(at - m["emitted_at"] for m, at in zip(w.messages, w.received_at, strict=True)
                        if window[0] <= at <= window[1] and m.get("emitted_at"))  # fmt: skip
        assert len(delays) > 20, len(delays)
        update_p99 = delays[int(0.99 * (len(delays) - 1))]
        print(f"watcher: {len(delays)} updates during the uploads, p99 delay {update_p99 * 1000:.1f} ms")
        assert update_p99 < 0.1
        latencies.sort()
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        p50, worst = latencies[len(latencies) // 2], latencies[-1]
        print(f"uploads {min(uploads):.2f}-{max(uploads):.2f} s; /healthz x{len(latencies)}: p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
        assert len(latencies) > 20 and p99 < 0.1  # ...and the loop answered meanwhile
        deep = httpx.post(live.base + "/api/jobs", content=b"[" * 100_000 + b"]" * 100_000,
                          headers={"Content-Type": "application/json"})  # parsed in a pool thread: still a 400
        assert deep.status_code == 400 and deep.json()["field"] == "body"


def _slow_upload(port: int, token: str | None = None) -> socket.socket:
    """A POST that announces a 1 MB body and sends one byte of it (then nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall((f"POST /api/jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: multipart/form-data; boundary=b\r\n"
                  "Content-Length: 1000000\r\n\r\n-").encode())  # fmt: skip
    return sock


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def test_slow_bodies_cost_the_web_tier_nothing_and_one_token_holds_only_its_share(tmp_path, tiny_dir):
    env = {"FRAMEPACK_API_TOKENS": "ann:tok-ann-0123456789,bob:tok-bob-0123456789",
           "FRAMEPACK_BODY_MIN_RATE": str(1_000_000), "FRAMEPACK_MAX_UPLOADS_PER_TOKEN": "4"}  # fmt: skip
    with running_stack(tmp_path, tiny_dir, env) as live:
        port = int(live.base.rsplit(":", 1)[1])
        t0 = time.monotonic()
        # one token: 4 uploads held, the 5th and 6th refused at once; another token is not affected
        ann = [_slow_upload(port, "tok-ann-0123456789") for _ in range(6)]
        bob = _slow_upload(port, "tok-bob-0123456789")
        assert [_status(s) for s in ann[4:]] == [429, 429]
        # a thousand slow bodies from one address: 16 per address are held (4 of them ann's), the rest refused
        crowd = [_slow_upload(port) for _ in range(1000)]
        latencies = []
        with httpx.Client(base_url=live.base, timeout=10) as probe:
            for _ in range(100):
                t = time.monotonic()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - t)
                time.sleep(0.02)
        statuses = Counter(_status(s) for s in crowd)
        assert statuses[429] >= 1000 - 16 + 5, statuses
        # the held ones end with 408 once their deadline (10 s + 1 MB at 1 MB/s) has passed
        held = [s for s in ann[:4]] + [bob]
        assert [_status(s) for s in held] == [408] * 5
        assert time.monotonic() - t0 < 11 + 30
        latencies.sort()
        p99 = latencies[98]
        print(f"/healthz under 1,000 slow bodies: p50 {latencies[50] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
              f"{dict(statuses)}")
        assert p99 < 0.1
        for s in ann + crowd + [bob]:
            s.close()


def test_a_job_whose_whole_worker_died_resumes_from_its_checkpoint_within_a_minute(tmp_path, tiny_dir):
    """``kill -9`` of the Celery worker's process group (parent and pool child, as when a host or
    ``make run`` dies): the job's message sits unacknowledged, and used to come back only after
    the visibility timeout (hours) or fail after ``stall_fail_seconds``.  A new worker resumes it
    from the last section it finished, with no operator action."""
    run = {"total_second_length": 3.6, "steps": 60, "seed": 7, "use_teacache": "false"}
    with running_stack(tmp_path, tiny_dir) as live:
        job = live.submit(**run)
        deadline = time.monotonic() + 120
        while len(live.job(job["id"])["sections_done"]) < 1:
            assert time.monotonic() < deadline, "section 1 never finished"
            time.sleep(0.05)
        worker = live.workers[0]
        os.killpg(worker.popen.pid, signal.SIGKILL)  # the parent and its pool child
        worker.popen.wait()
        killed = time.monotonic()
        assert live.job(job["id"])["state"] == "running"
        worker.__enter__()  # a new worker, as the supervisor (or a new `make run`) starts one
        while (view := live.job(job["id"]))["state"] == "running" and view["attempts"] < 2:
            assert time.monotonic() - killed < 60, f"not resumed in a minute: {view['attempts']=}"
            time.sleep(0.1)
        resumed_after = time.monotonic() - killed
        while (view := live.job(job["id"]))["state"] == "running":
            assert time.monotonic() - killed < 240, view["message"]
            time.sleep(0.2)
        assert view["state"] == "succeeded" and view["attempts"] == 2, view
        assert view["result"]["resumed_from_section"] >= 1
        print(f"resumed {resumed_after:.1f} s after the kill, from section {view['result']['resumed_from_section']}")


def _launcher(tmp_path, tiny_dir, port: int, log_name: str) -> subprocess.Popen:
    """``python -m stack`` (what ``make run`` runs) with its state in ``tmp_path``."""
    from stack import ROOT

    from .conftest import STACK_ENV

    ours = ("REDIS_URL", "CELERY_", "FRAMEPACK_", "RESULTS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(STACK_ENV, PORT=str(port), FRAMEPACK_STACK_DIR=str(tmp_path / "state"),
               FRAMEPACK_CACHE=str(tiny_dir.parent), PYTHONUNBUFFERED="1")  # fmt: skip
    log = open(tmp_path / log_name, "wb")  # noqa: SIM115 — the child holds it
    return subprocess.Popen([sys.executable, "-m", "stack"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def _job(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/api/jobs/{job_id}", timeout=30).json()


def _submit(base: str, **fields) -> dict:
    from .conftest import png_bytes

    resp = httpx.post(f"{base}/api/jobs", files={"image": ("i.png", png_bytes(), "image/png")},
                      data={k: str(v) for k, v in fields.items()}, timeout=30)  # fmt: skip
    assert resp.status_code == 202, resp.text
    return resp.json()


def _after_section_one(base: str, job_id: str) -> None:
    deadline = time.monotonic() + 120
    while not _job(base, job_id)["sections_done"]:
        assert time.monotonic() < deadline, "section 1 never finished"
        time.sleep(0.1)


def _all_end(base: str, ids: list[str], timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        views = [_job(base, i) for i in ids]
        if all(v["state"] in ("succeeded", "failed", "cancelled") for v in views):
            return views
        assert time.monotonic() < deadline, [(v["state"], v["attempts"]) for v in views]
        time.sleep(0.5)


def test_the_stack_keeps_its_parts_alive_and_a_killed_stack_resumes_its_job(tmp_path, tiny_dir):
    from stack import free_port, wait_http

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = {"total_second_length": 3.6, "steps": 40, "seed": 3, "use_teacache": "false"}
    short = {"total_second_length": 1, "steps": 2}
    valkey_pid = tmp_path / "state" / "valkey" / "valkey.pid"
    first = _launcher(tmp_path, tiny_dir, port, "first.log")
    try:
        wait_http(base + "/readyz", 300)
        # 1. kill -9 the embedded Valkey with one job running and three queued: it comes back, all succeed
        running = _submit(base, **run)
        queued = [_submit(base, **short)["id"] for _ in range(3)]
        _after_section_one(base, running["id"])
        os.kill(int(valkey_pid.read_text()), signal.SIGKILL)
        views = _all_end(base, [running["id"], *queued])
        assert [v["state"] for v in views] == ["succeeded"] * 4, views
        assert views[0]["attempts"] == 1  # rode through the gap, never restarted
        assert "valkey exited unexpectedly; starting it again" in (tmp_path / "first.log").read_text()

        # 2. kill -9 the launcher itself mid-job: its children die with it; a new launcher resumes the job
        running = _submit(base, **run)
        queued = [_submit(base, **short)["id"] for _ in range(3)]
        _after_section_one(base, running["id"])
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(1.0)
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/healthz", timeout=2)  # the web tier died with it
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGINT)
            first.wait(60)
    second = _launcher(tmp_path, tiny_dir, port, "second.log")
    try:
        wait_http(base + "/readyz", 300)
        views = _all_end(base, [running["id"], *queued])
        assert [v["state"] for v in views] == ["succeeded"] * 4, views
        assert views[0]["attempts"] == 2 and views[0]["result"]["resumed_from_section"] >= 1, views[0]["result"]
        output = (tmp_path / "second.log").read_text()
        assert "stopped the Valkey a killed launcher left running" in output, output[-2000:]
        password = (tmp_path / "state" / "valkey" / ".password").read_text().strip()
        assert password not in output + (tmp_path / "first.log").read_text()  # never printed
    finally:
        os.killpg(second.pid, signal.SIGINT)
        second.wait(60)
