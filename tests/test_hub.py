"""The hub against a real (embedded) Valkey: one reader, every update once, in order."""

from __future__ import annotations

import json
import threading
import time

import redis

from tasks.protocol import Keys
from webapp.hub import JobHub
from webapp.outbox import Item


def test_a_slow_fan_out_never_lets_the_poll_overtake_queued_updates(valkey_url: str):
    """While the hub hands one update to thousands of watchers, more are published and wait
    in its subscription.  Its polling fallback (the latest meta) must not jump ahead of
    them: they would be dropped as already delivered, for every watcher (a section too)."""
    hub = JobHub(valkey_url, lambda _job, meta: meta, poll_interval=0.01)
    seen: list[int] = []
    done = threading.Event()

    def slow_watchers(item: Item) -> bool:  # the producer's time for one update to many sockets
        time.sleep(0.03)
        seen.append(item.seq)
        if item.seq == 30:
            done.set()
        return False

    outbox = hub.new_outbox(accept=slow_watchers)
    hub.watch_job("job1", outbox)
    r = redis.Redis.from_url(valkey_url)
    key = Keys.celery_meta("job1")
    for seq in range(1, 31):  # what Celery's backend does per update_state: SET, then PUBLISH
        doc = json.dumps({"status": "PROGRESS", "result": {"seq": seq, "state": "running", "event": "progress"}})
        r.set(key, doc)
        r.publish(key, doc)
    assert done.wait(30), f"the last update never came: {seen}"
    assert seen == list(range(1, 31))


def test_updates_arriving_during_a_fan_out_join_it_and_reach_every_watcher_once_in_order(valkey_url, monkeypatch):
    """Bursts: while the first update goes out (slices of one watcher here), 2 and 3 arrive
    after the first watcher was served, 4 and 5 after the second.  The watchers still to come
    take them with the first; a watcher already served gets everything it lacks in one more
    write, not one per burst.  Each socket carries 1..5 once, in order, in one fan-out."""
    import webapp.hub as hub_module
    from webapp.outbox import Outbox

    from .test_outbox import attached_outbox, read_frames

    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 1)
    r = redis.Redis.from_url(valkey_url)
    key = Keys.celery_meta("burst")
    probe = r.pubsub()
    probe.subscribe(key)  # after the hub's subscription: when the probe has them, so (nearly) has the hub

    def update(seq: int) -> None:
        doc = json.dumps({"status": "PROGRESS", "result": {"seq": seq, "state": "running", "event": "progress"}})
        r.set(key, doc)
        r.publish(key, doc)

    bursts = [(2, 3), (4, 5)]

    def pause() -> None:  # between slices of the fan-out: a burst arrives (the first two pauses)
        if bursts:
            burst = bursts.pop(0)
            for seq in burst:
                update(seq)
            got = 0
            while got < len(burst):
                msg = probe.get_message(timeout=5)
                assert msg is not None, "the burst never arrived"
                got += msg["type"] == "message"

    monkeypatch.setattr(hub_module, "let_others_run", pause)
    writes: dict[Outbox, list[list[int]]] = {}
    put = Outbox.put
    monkeypatch.setattr(Outbox, "put", lambda box, msg: writes.setdefault(box, []).append([i.seq for i in msg.items])
                        or put(box, msg))  # fmt: skip
    hub = JobHub(valkey_url, lambda _job, meta: meta, poll_interval=60)
    fan_outs: list[str] = []
    ended = threading.Event()  # the sockets have every byte a moment before the fan-out returns
    dispatch = hub._dispatch
    monkeypatch.setattr(hub, "_dispatch", lambda *a, **kw: fan_outs.append(a[0]) or dispatch(*a, **kw) or ended.set())
    watchers = [attached_outbox() for _ in range(3)]
    for box, _server, _client in watchers:
        hub.watch_job("burst", box)
    probe.get_message(timeout=5)  # its subscribe confirmation
    update(1)
    for _box, _server, client in watchers:
        seqs: list[int] = []
        data = b""
        deadline = time.monotonic() + 10
        while len(seqs) < 5 and time.monotonic() < deadline:
            frames, data = read_frames(client, data)
            seqs += [json.loads(payload)["seq"] for _op, payload in frames]
        assert seqs == [1, 2, 3, 4, 5]
    order = sorted(writes[box] for box, _server, _client in watchers)  # the hub serves them in its own order
    assert order[0] == [[1], [2, 3, 4, 5]]  # served first: one write for both bursts
    assert all(sum(w, []) == [1, 2, 3, 4, 5] and len(w) <= 2 for w in order)
    assert ended.wait(5) and hub.stats["messages"] == 5 and not bursts and len(fan_outs) == 1
