"""The outbox alone, over a socketpair: frames, partial sends, slow readers — no Redis, no server.

The hub's reader thread (a greenlet under gevent) writes to every watcher's socket itself;
these tests pin what that may and may not do: never wait for a reader, never split or
interleave frames, keep progress/section/final, let a newer preview replace stale ones.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

from webapp.framing import PING_FRAME, text_frame
from webapp.outbox import Item, Outbox


class FakeWs:
    """What :meth:`Outbox.own` needs of a simple-websocket connection: its socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock


def read_frames(sock: socket.socket, data: bytes = b"") -> tuple[list[tuple[int, bytes]], bytes]:
    """Parse every complete server frame in ``data`` + what the socket has now: (opcode, payload)."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    frames = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        head = 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[2:10], "big"), 10
        if len(data) < head + n:
            break
        frames.append((opcode, data[head : head + n]))
        data = data[head + n :]
    return frames, data


def attached_outbox(sndbuf: int | None = None) -> tuple[Outbox, socket.socket, socket.socket]:
    """An outbox owning one end of a socketpair, attached (direct writes allowed): (box, server, client)."""
    server, client = socket.socketpair()
    if sndbuf:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    box = Outbox()
    box.own(FakeWs(server))
    box.attach(sent_seq=0)
    return box, server, client


def progress(seq: int, preview: bool = True, size: int = 100) -> Item:
    data = {"type": "progress", "seq": seq, **({"preview": {"image": "x" * size}} if preview else {})}
    lite = json.dumps({"type": "progress", "seq": seq}) if preview else None
    return Item("progress", seq, json.dumps(data), lite, data)


def test_text_frame_lengths_follow_rfc6455():
    for n, head in ((5, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)):
        frame = text_frame("a" * n)
        assert len(frame) == head + n and frame[0] == 0x81
        assert read_frames_from_bytes(frame) == [(1, b"a" * n)]


def read_frames_from_bytes(data: bytes) -> list[tuple[int, bytes]]:
    a, b = socket.socketpair()
    try:
        return read_frames(b, data)[0]
    finally:
        a.close()
        b.close()


def test_an_attached_socket_gets_each_message_once_written_by_the_producer():
    box, server, client = attached_outbox()
    box.attach(sent_seq=2)  # the snapshot carried seq 2
    assert box.put(progress(1)) is False  # already in the snapshot: not sent again
    assert box.put(progress(3)) is False  # written directly: no thread to wake
    frames, _ = read_frames(client)
    assert [json.loads(p)["seq"] for _, p in frames] == [3]
    assert box.sent_seq == 3


def test_a_stalled_reader_never_blocks_the_producer_and_gets_the_newest_preview():
    box, server, client = attached_outbox(sndbuf=4096)
    for seq in range(1, 201):  # ~20 MB offered to a reader that reads nothing
        box.put(progress(seq, size=100_000))
    section = Item("section", 201, json.dumps({"type": "section", "seq": 201}), None, {})
    box.put(section)
    box.put(progress(202, size=100_000))
    pending = list(box._items)
    with_preview = [i for i in pending if "preview" in i.text]
    assert [i.seq for i in with_preview] == [202]  # latest wins
    assert 201 in [i.seq for i in pending]  # a section is never dropped
    assert box.stats["dropped_previews"] > 0

    # the reader catches up: whole frames in order, the partial one first
    received = read_all_in_background(client)
    while box._items or box._partial:
        assert box.drain(timeout=0) == "sent"
    server.close()
    frames, rest = read_frames_from_bytes(received.result(timeout=30)), b""
    seqs = [json.loads(p)["seq"] for _, p in frames]
    assert seqs == sorted(seqs) and seqs[-2:] == [201, 202] and rest == b""


def read_all_in_background(sock: socket.socket):
    """Everything the peer writes until it closes, read by another thread (a Future)."""
    from concurrent.futures import ThreadPoolExecutor

    def run() -> bytes:
        sock.setblocking(True)
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
        return data

    pool = ThreadPoolExecutor(1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def test_a_ping_never_lands_inside_a_partly_sent_frame():
    box, server, client = attached_outbox(sndbuf=4096)
    box.put(progress(1, size=300_000))  # far more than the buffer: the producer leaves a tail
    assert box._partial
    received = read_all_in_background(client)
    box.ping()  # simple-websocket's writes (pongs, close) take this path too
    server.close()
    frames = read_frames_from_bytes(received.result(timeout=30))
    assert [op for op, _ in frames] == [1, 9]  # the whole text frame, then the ping
    assert len(frames[0][1]) > 300_000 and PING_FRAME == bytes((0x89, 0))


def test_overflow_is_flagged_for_a_reader_that_never_catches_up():
    box = Outbox(limit=10)  # no socket (SSE): everything waits in the outbox
    for seq in range(1, 12):
        box.put(Item("section", seq, "{}", None, {}))
    assert box.overflowed and box.drain(timeout=0) == "overflow"


def test_under_gevent_the_producer_never_waits_for_a_stalled_socket():
    """Gevent sockets wait (yield) on a full buffer where a stdlib one raises: the producer
    must use the OS socket underneath, or one stalled watcher would stall the hub."""
    code = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import gevent, json, socket
        from webapp.outbox import Item, Outbox
        from tests.test_outbox import FakeWs, progress
        server, client = socket.socketpair()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        try:  # a reader that stopped reading: its socket's buffer is full
            while True:
                server._sock.send(b"x" * 4096)
        except BlockingIOError:
            pass
        box = Outbox()
        box.own(FakeWs(server))
        box.attach(sent_seq=0)
        with gevent.Timeout(20, AssertionError("the producer waited on a stalled socket")):
            for seq in range(1, 101):
                box.put(progress(seq, size=100_000))
        print(json.dumps([i.seq for i in box._items if "preview" in i.text]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [100]
