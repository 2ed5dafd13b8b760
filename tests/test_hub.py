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
