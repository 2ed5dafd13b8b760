"""The hub against a real (embedded) Valkey: one reader, every update once, in order."""

from __future__ import annotations

import json
import threading
import time

import redis

from tasks.protocol import Keys
from webapp.hub import JobHub
from webapp.outbox import Item


def progress(seq: int) -> str:
    """Update ``seq`` as Celery's backend stores and publishes it (``update_state``)."""
    return json.dumps({"status": "PROGRESS", "result": {"seq": seq, "state": "running", "event": "progress"}})


def seqs_read(client, n: int) -> list[int]:
    """The seqs of the first ``n`` messages on a watcher's socket (fewer if they stop coming)."""
    from .test_outbox import read_frames

    seqs: list[int] = []
    data = b""
    deadline = time.monotonic() + 10
    while len(seqs) < n and time.monotonic() < deadline:
        frames, data = read_frames(client, data)
        seqs += [json.loads(payload)["seq"] for _op, payload in frames]
    return seqs


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
        doc = progress(seq)
        r.set(key, doc)
        r.publish(key, doc)
    assert done.wait(30), f"the last update never came: {seen}"
    assert seen == list(range(1, 31))


def test_updates_arriving_during_a_fan_out_join_it_and_reach_every_watcher_once_in_order(valkey_url, monkeypatch):
    """Bursts: while the first update goes out (slices of one watcher here), 2 and 3 arrive
    after the first watcher was served, 4 and 5 after the second.  The watchers still to come
    take them with the first; a watcher already served gets everything it lacks in one more
    write, not one per burst.  Each socket carries 1..5 once, in order, in one fan-out.
    (What arrives when is scripted here; the next test takes its updates from Valkey.)"""
    import webapp.hub as hub_module
    from webapp.outbox import Outbox

    from .test_outbox import attached_outbox

    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 1)
    monkeypatch.setattr(hub_module, "let_others_run", lambda: None)

    def doc(seq: int) -> bytes:
        return progress(seq).encode()

    bursts = [[doc(2), doc(3)], [doc(4), doc(5)]]
    absorb = lambda: bursts.pop(0) if bursts else []  # noqa: E731  (what the pubsub connection received since)
    writes: dict[Outbox, list[list[int]]] = {}
    put = Outbox.put
    monkeypatch.setattr(Outbox, "put", lambda box, msg: writes.setdefault(box, []).append([i.seq for i in msg.items])
                        or put(box, msg))  # fmt: skip
    hub = JobHub(valkey_url, lambda _job, meta: meta, poll_interval=60)
    watchers = [attached_outbox() for _ in range(3)]
    for box, _server, _client in watchers:
        hub.watch_job("burst", box)
    hub._dispatch(Keys.celery_meta("burst"), [doc(1)], live=True, absorb=absorb)
    for _box, _server, client in watchers:
        assert seqs_read(client, 5) == [1, 2, 3, 4, 5]
    order = sorted(writes[box] for box, _server, _client in watchers)  # the hub serves them in its own order
    assert order == [[[1], [2, 3, 4, 5]], [[1, 2, 3], [4, 5]], [[1, 2, 3, 4, 5]]]
    assert hub.stats["messages"] == 5 and not bursts


def test_a_channel_that_never_pauses_cannot_keep_one_fan_out_going(valkey_url, monkeypatch):
    """Updates that keep arriving join a fan-out only up to BATCH_LIMIT: then it ends and the
    next one takes the rest (other channels, polls and collections get their turn between)."""
    import webapp.hub as hub_module

    from .test_outbox import attached_outbox

    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 1)
    monkeypatch.setattr(hub_module, "BATCH_LIMIT", 5)
    r = redis.Redis.from_url(valkey_url)
    key = Keys.celery_meta("endless")
    published = [0]

    def update() -> None:
        published[0] += 1
        doc = progress(published[0])
        r.set(key, doc)
        r.publish(key, doc)

    probe = r.pubsub()

    def delivered_update() -> None:
        update()
        while (msg := probe.get_message(timeout=5)) is not None and msg["type"] != "message":
            pass  # when the probe has it, so (nearly) has the hub

    def pause() -> None:  # one more update between every two slices, 20 in all
        if published[0] < 20:
            delivered_update()

    monkeypatch.setattr(hub_module, "let_others_run", pause)
    hub = JobHub(valkey_url, lambda _job, meta: meta, poll_interval=60)
    carried: list[int] = []
    all_carried = threading.Event()  # the sockets have every byte a moment before the fan-out returns
    dispatch = hub._dispatch

    def counted(*a, **kw):
        before = hub.stats["messages"]
        dispatch(*a, **kw)
        carried.append(hub.stats["messages"] - before)
        if sum(carried) >= 20:
            all_carried.set()

    monkeypatch.setattr(hub, "_dispatch", counted)
    watchers = [attached_outbox() for _ in range(2)]
    for box, _server, _client in watchers:
        assert hub.watch(key, box)  # subscribed
    probe.subscribe(key)
    delivered_update()
    for _box, _server, client in watchers:
        assert seqs_read(client, 20) == list(range(1, 21))
    assert all_carried.wait(5) and sum(carried) == 20 and len(carried) >= 2 and max(carried) < 2 * 5, carried
