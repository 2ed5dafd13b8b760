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
    """A burst: while the first update goes out (slices of one watcher here), three more
    arrive.  The watchers still to come take them with the first, those already served right
    after; each watcher's socket carries 1..4 once, in order, and fewer fan-outs than updates ran."""
    import webapp.hub as hub_module

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

    bursts = []

    def pause() -> None:  # between slices of the first fan-out: the burst arrives
        if not bursts:
            bursts.append(True)
            for seq in (2, 3, 4):
                update(seq)
            got = 0
            while got < 3:
                msg = probe.get_message(timeout=5)
                assert msg is not None, "the burst never arrived"
                got += msg["type"] == "message"

    monkeypatch.setattr(hub_module, "let_others_run", pause)
    hub = JobHub(valkey_url, lambda _job, meta: meta, poll_interval=60)
    fan_outs = []
    dispatch = hub._dispatch
    monkeypatch.setattr(hub, "_dispatch", lambda *a, **kw: fan_outs.append(a[0]) or dispatch(*a, **kw))
    watchers = [attached_outbox() for _ in range(3)]
    for box, _server, _client in watchers:
        hub.watch_job("burst", box)
    probe.get_message(timeout=5)  # its subscribe confirmation
    update(1)
    for _box, _server, client in watchers:
        seqs: list[int] = []
        data = b""
        deadline = time.monotonic() + 10
        while len(seqs) < 4 and time.monotonic() < deadline:
            frames, data = read_frames(client, data)
            seqs += [json.loads(payload)["seq"] for _op, payload in frames]
        assert seqs == [1, 2, 3, 4]
    assert hub.stats["messages"] == 4 and bursts and len(fan_outs) == 1
