"""The watch every stream shares and the wire framings, without servers: pure functions,
an outbox over a socketpair, and the hub's capacity (no Redis is reached)."""

from __future__ import annotations

import json
import socket
import threading

from webapp import watch
from webapp.framing import KEEP_ALIVE_EVENT, http_chunk, sse_event, text_frame
from webapp.hub import JobHub
from webapp.outbox import Item, Outbox


def item(seq: int, kind: str = "progress") -> Item:
    data = {"type": kind, "seq": seq}
    return Item(kind, seq, json.dumps(data), None, data)


def test_sse_event_frames_text_and_json_and_chunks_count_bytes_in_hex():
    assert sse_event("progress", '{"a":1}', 7) == 'id: 7\nevent: progress\ndata: {"a":1}\n\n'
    assert sse_event(None, {"status": "ok", "n": [1, 2]}) == 'data: {"status":"ok","n":[1,2]}\n\n'
    assert sse_event(None, "x.mp4", 0) == "data: x.mp4\n\n"  # no seq, no id line
    assert KEEP_ALIVE_EVENT.startswith(":")  # a comment: EventSource ignores it
    assert http_chunk(b"") == b"0\r\n\r\n" and http_chunk(b"a" * 26) == b"1A\r\n" + b"a" * 26 + b"\r\n"
    assert text_frame("hi") == b"\x81\x02hi"


def test_admit_gives_slots_up_to_capacity_and_each_release_counts_once():
    hub = JobHub("redis://127.0.0.1:1/0", lambda job_id, meta: meta, capacity=2)
    first, second = watch.admit(hub), watch.admit(hub)
    assert first and second and watch.admit(hub) is None and hub.stats["refused"] == 1
    first()
    first()  # a second release of the same slot frees nothing more
    assert hub.open_streams == 1
    third = watch.admit(hub)
    assert third is not None and watch.admit(hub) is None


def test_updates_skip_what_the_snapshot_held_keep_alive_when_idle_and_end_on_overflow():
    box = Outbox(limit=3)
    for seq in (3, 4, 5):
        box.put(item(seq))
    got = watch.updates(box, after_seq=4, keep_alive=0.01)
    assert next(got).seq == 5  # 3 and 4 were in the snapshot
    assert next(got) is None  # idle: a keep-alive
    for seq in range(6, 12):  # more than the outbox holds for a reader that does not read
        box.put(item(seq))
    assert box.overflowed and list(got) == []


def test_pump_writes_the_updates_after_the_snapshot_and_ends_after_the_final():
    server, client = socket.socketpair()
    box = Outbox()
    box.own_stream(server, chunked=False)
    box.put(item(1))  # before attach: queued; seq 1 was in the snapshot, so never written
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(watch.pump(box, 1, lambda: True, lambda: 0.01)))
    t.start()
    box.put(item(2))
    box.put(item(3, "final"))
    t.join(5)
    assert result == ["final"]
    client.setblocking(False)
    data = client.recv(1 << 16).decode()
    assert "id: 1\n" not in data and data.index("id: 2\n") < data.index("event: final\n")
    box.put(item(4))  # after pump returned the producer writes nothing more
    try:
        assert client.recv(1 << 16) == b""
    except BlockingIOError:
        pass


def test_pump_calls_idle_when_nothing_comes_and_stops_when_the_client_is_gone():
    server, client = socket.socketpair()
    box = Outbox()
    box.own_stream(server, chunked=True)
    idles: list[int] = []
    assert watch.pump(box, 0, lambda: idles.append(1) or len(idles) < 3, lambda: 0.01) == "dead"
    assert len(idles) == 3  # a keep-alive each idle period, until it says the client is gone
    client.close()
    box.put(item(1))  # the producer's write fails: the next pump sees a dead client at once
    assert watch.pump(box, 0, lambda: True, lambda: 5.0) == "dead"
