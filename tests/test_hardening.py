"""No single client can stall the web tier: uploads that cost seconds of CPU to decode run off
the event loop (issue 20), against the real gevent server."""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from collections import Counter

import httpx
import pytest

from .conftest import running_stack

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
        uploads: list[float] = []

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
        assert len(uploads) == 8 and max(uploads) > 1.0  # the decodes really took time...
        latencies.sort()
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        p50, worst = latencies[len(latencies) // 2], latencies[-1]
        print(f"uploads {min(uploads):.2f}-{max(uploads):.2f} s; /healthz x{len(latencies)}: p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
        assert len(latencies) > 20 and p99 < 0.1  # ...and the loop answered meanwhile


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
