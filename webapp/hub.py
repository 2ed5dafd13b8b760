"""One reader per web process, fanning every job update out to all its watchers.

Celery's Redis backend PUBLISHes every ``update_state`` on ``celery-task-meta-<id>``.  A
single thread per web process holds one pub/sub connection, subscribes to the channels
of the jobs someone watches (plus the all-jobs feed), decodes and encodes each update
*once*, and offers it to every watcher's :class:`webapp.outbox.Outbox` (frames and socket
handling live there, testable without Redis).  Redis work per update is therefore the same
for 1 or 2,000 watchers.  Under the gevent server the reader is a greenlet, as is each
socket's handler; a watcher that stops reading only ever delays itself: pending previews
are replaced by newer ones (latest wins) while progress, section and final messages are
kept.  :meth:`JobHub.admit` caps the streams a process serves (``watcher_capacity``).

A polling fallback (GET of the meta key every few seconds for watched jobs that were quiet
meanwhile, once nothing received is left unread) covers updates published while the
subscription was being (re)established, without ever overtaking a queued update.  The same
gaps take the web process's full garbage collections (:mod:`webapp.gcpolicy`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from tasks.protocol import CELERY_META_PREFIX, TERMINAL, Keys, encode, message_type, parse_celery_payload

from . import gcpolicy
from .outbox import Batch, Item, Outbox, greenlets_only

log = logging.getLogger("framepack.hub")


#: Watchers the hub serves before it lets other greenlets (requests) run: at 16–32 µs per
#: watcher (a TCP send, measured at 2,000 on two 2-core machines), 3–6 ms.
FANOUT_SLICE = 200
#: Most updates read from Redis at once and fanned out together (one write per watcher).
BATCH_LIMIT = 64

Transform = Callable[[str, dict[str, Any]], dict[str, Any]]


def let_others_run() -> None:
    """Pause a long loop so that requests waiting on I/O get their turn.

    Under gevent ``sleep(0)`` runs only the greenlets already scheduled, without polling for
    I/O: a request waiting for Redis's answer or for its next bytes would wait for the whole
    fan-out (measured: REST p99 = the fan-out's duration at 2,000 watchers).  ``gevent.idle``
    returns once the event loop has dealt with everything pending, I/O included.  Threads
    need only give up the GIL."""
    if greenlets_only():
        sys.modules["gevent"].idle()
    else:
        time.sleep(0)


class _CpuClock:
    """This thread's CPU time in a fan-out, less the pauses in which others run."""

    def __init__(self) -> None:
        self.cpu, self._mark = 0.0, time.thread_time()

    def pause(self) -> None:
        """Under gevent a fan-out is the only thing the process runs until it ends: between
        slices, waiting requests get their turn, so REST stays responsive."""
        self.cpu += time.thread_time() - self._mark
        let_others_run()
        self._mark = time.thread_time()

    def stop(self) -> float:
        self.cpu += time.thread_time() - self._mark
        return self.cpu


class JobHub:
    def __init__(self, redis_url: str, decorate: Transform, poll_interval: float = 2.0, metrics: Any = None,
                 capacity: int = 0):  # fmt: skip
        """``decorate(job_id, meta)`` adds URLs etc. to a meta before it is encoded;
        ``metrics`` (:class:`webapp.metrics.WebMetrics`) counts watchers and preview latency;
        ``capacity``: streams :meth:`admit` lets in at once (0: no limit)."""
        self.metrics = metrics
        self.capacity = capacity
        self.open_streams = 0
        if metrics is not None and capacity:
            metrics.capacity.set(capacity)
        self.redis = redis.Redis.from_url(redis_url)
        self.decorate = decorate
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._watchers: dict[str, set[Outbox]] = {}
        self._last_seq: dict[str, int] = {}
        self._last_preview: dict[str, str] = {}
        self._changes: deque[tuple[str, str]] = deque()
        self._subscribed: dict[str, threading.Event] = {}
        self._thread: threading.Thread | None = None
        self.stats = {"messages": 0, "polls": 0, "delivered": 0, "dropped_previews": 0, "overflowed": 0,
                      "refused": 0}  # fmt: skip

    # -- capacity -----------------------------------------------------------------------
    def admit(self) -> bool:
        """Take one of this process's stream slots, or say at once that none is free.

        A server that runs out of connections (threads, or gevent's worker_connections)
        stops accepting and a new watcher waits silently; refusing below that point lets it
        hear "try again later" instead.  Every True is paired with :meth:`release`."""
        with self._lock:
            if self.capacity and self.open_streams >= self.capacity:
                self.stats["refused"] += 1
                if self.metrics is not None:
                    self.metrics.refused.inc()
                return False
            self.open_streams += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.open_streams -= 1

    # -- watchers ---------------------------------------------------------------------
    def new_outbox(self, accept: Callable[[Item], bool] | None = None) -> Outbox:
        return Outbox(stats=self.stats, accept=accept)

    def watch(self, channel: str, outbox: Outbox, timeout: float = 5.0) -> bool:
        """Add a watcher; returns once Redis has confirmed the subscription, so a snapshot
        read afterwards misses nothing: later updates arrive here, earlier ones are in it."""
        with self._lock:
            first = channel not in self._watchers
            group = self._watchers.setdefault(channel, set())
            if outbox not in group and self.metrics is not None:
                self.metrics.watchers.inc()
            group.add(outbox)
            if first:
                self._subscribed[channel] = threading.Event()
                self._changes.append(("sub", channel))
            confirmed = self._subscribed[channel]
        self._ensure_thread()
        return confirmed.wait(timeout)

    def unwatch(self, channel: str, outbox: Outbox) -> None:
        with self._lock:
            group = self._watchers.get(channel)
            if group is None or outbox not in group:
                return
            group.discard(outbox)
            if self.metrics is not None:
                self.metrics.watchers.dec()
            if not group:
                del self._watchers[channel]
                self._subscribed.pop(channel, None)
                self._changes.append(("unsub", channel))
                if channel.startswith(CELERY_META_PREFIX):
                    self._last_seq.pop(channel[len(CELERY_META_PREFIX) :], None)
                    self._last_preview.pop(channel[len(CELERY_META_PREFIX) :], None)

    def watch_job(self, job_id: str, outbox: Outbox) -> None:
        self.watch(Keys.celery_meta(job_id), outbox)

    def unwatch_job(self, job_id: str, outbox: Outbox) -> None:
        self.unwatch(Keys.celery_meta(job_id), outbox)

    @property
    def channels(self) -> int:
        with self._lock:
            return len(self._watchers)

    # -- the reader thread --------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="framepack-hub", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._listen()
            except redis.RedisError as exc:
                if self.metrics is not None:
                    self.metrics.redis_errors.labels("hub").inc()
                log.warning("hub lost Redis (%s); reconnecting", exc)
                time.sleep(0.5)

    def _listen(self) -> None:
        ps = self.redis.pubsub()
        with self._lock:
            channels = list(self._watchers)
            self._changes.clear()
        ps.subscribe(Keys.HUB, *channels)  # a fixed channel keeps the connection subscribed
        self._poll(channels)  # whatever was published while we were not listening
        next_poll = time.monotonic() + self.poll_interval
        live: set[str] = set()  # channels with a published update since the last poll
        last_update = time.monotonic()
        while True:
            while self._changes:
                op, channel = self._changes.popleft()
                (ps.subscribe if op == "sub" else ps.unsubscribe)(channel)
                if op == "sub":
                    self._poll([channel])
            # Whatever has arrived meanwhile is fanned out together: while one update goes to
            # 2,000 sockets the next few arrive (a job's start is a burst of stage updates),
            # and one write each for all of them costs little more than for one.  A fan-out
            # also takes in its channel's updates that arrive while it runs (``absorb``).
            arrived: dict[str, list[bytes]] = {}
            busy = self._read(ps, arrived, timeout=0.05)
            while arrived:
                channel = next(iter(arrived))
                raws = arrived.pop(channel)
                live.add(channel)
                self._dispatch(channel, raws, live=True, absorb=lambda c=channel: self._absorb(ps, arrived, c))
            if busy:  # after its fan-out, which took in whatever arrived meanwhile
                last_update = time.monotonic()
            if ps.connection.can_read(timeout=0):
                continue  # polls and collections wait until nothing received is left unread
            # a full garbage collection: here, not in a fan-out
            took = gcpolicy.collect_if_due(gap=not busy, quiet=time.monotonic() - last_update)
            if took is not None and self.metrics is not None:
                self.metrics.gc.observe(took)
            if time.monotonic() >= next_poll:
                # Only channels that were quiet, and only once everything received is read:
                # a poll's newer update would otherwise overtake ones still queued here,
                # which would then be dropped as already delivered.
                with self._lock:
                    quiet = [c for c in self._watchers if c not in live]
                live.clear()
                self._poll(quiet)
                next_poll = time.monotonic() + self.poll_interval

    def _read(self, ps: Any, arrived: dict[str, list[bytes]], timeout: float) -> int:
        """Add the updates already received (waiting up to ``timeout`` for a first one) to
        ``arrived`` (channel -> payloads, in order); confirm subscriptions.  Returns how many."""
        msg, n = ps.get_message(timeout=timeout), 0
        while msg is not None:
            if msg["type"] == "message":
                arrived.setdefault(msg["channel"].decode(), []).append(msg["data"])
                n += 1
            elif msg["type"] == "subscribe":
                with self._lock:
                    confirmed = self._subscribed.get(msg["channel"].decode())
                if confirmed is not None:
                    confirmed.set()
            msg = ps.get_message(timeout=0) if n < BATCH_LIMIT else None  # only what is here already
        return n

    def _absorb(self, ps: Any, arrived: dict[str, list[bytes]], channel: str) -> list[bytes]:
        """``channel``'s updates received since its fan-out began (other channels' wait in
        ``arrived``)."""
        self._read(ps, arrived, timeout=0)
        return arrived.pop(channel, [])

    def _poll(self, channels: list[str]) -> None:
        keys = [c for c in channels if c.startswith(CELERY_META_PREFIX)]
        if not keys:
            return
        self.stats["polls"] += 1
        for channel, raw in zip(keys, self.redis.mget(keys), strict=True):
            if raw is not None:
                self._dispatch(channel, [raw])

    def _items(self, channel: str, raws: list[bytes]) -> tuple[Item, ...]:
        if channel.startswith(CELERY_META_PREFIX):
            job_id = channel[len(CELERY_META_PREFIX) :]
            return tuple(item for raw in raws if (item := self._job_item(job_id, raw)) is not None)
        return tuple(Item("jobs", 0, raw.decode(), None, json.loads(raw)) for raw in raws)

    def _dispatch(self, channel: str, raws: list[bytes], live: bool = False,
                  absorb: Callable[[], list[bytes]] | None = None) -> None:  # fmt: skip
        """Fan out the updates ``raws`` of one channel, in order, together.  ``live``: just
        published (a poll's re-read of an older update is not latency).  ``absorb``: the
        channel's updates received since; looked at between slices, they join this fan-out:
        the watchers still to come take them with the rest, and the watchers already served
        get everything they lack in one more write, in a pass that absorbs too.  In a burst
        (a job's start: six updates within 60 ms) an update then waits for part of a pass,
        not for the passes of every update before it."""
        items = list(self._items(channel, raws))
        if not items:
            return
        started, clock = time.perf_counter(), _CpuClock()
        with self._lock:
            outboxes = list(self._watchers.get(channel, ()))
        offered = [0] * len(outboxes)  # how many of ``items`` each watcher has been offered
        wire: dict[int, Item | Batch] = {}  # items[k:] as one message, built once per k
        to_wake: dict[Outbox, None] = {}
        served = 0
        while lagging := [i for i, k in enumerate(offered) if k < len(items)]:
            for i in lagging:
                k = offered[i]
                if (msg := wire.get(k)) is None:
                    msg = wire[k] = items[k] if k == len(items) - 1 else Batch(tuple(items[k:]))
                if outboxes[i].put(msg):
                    to_wake[outboxes[i]] = None
                offered[i] = len(items)
                served += 1
                if served % FANOUT_SLICE == 0:
                    clock.pause()
                    # bounded: a channel that never pauses cannot keep this fan-out going for good
                    if absorb is not None and len(items) < BATCH_LIMIT and (new := self._items(channel, absorb())):
                        items += new
                        wire.clear()
        for box in to_wake:
            box.wake()
        self.stats["messages"] += len(items)
        self.stats["delivered"] += len(outboxes) * len(items)
        if not outboxes or self.metrics is None:
            return
        self.metrics.fanout.observe(time.perf_counter() - started)
        self.metrics.fanout_cpu.inc(clock.stop())
        for item in items if live else ():
            if item.data.get("preview") and item.data.get("emitted_at"):
                self.metrics.preview_latency.observe(max(0.0, time.time() - float(item.data["emitted_at"])))

    def _job_item(self, job_id: str, raw: bytes) -> Item | None:
        state, meta = parse_celery_payload(raw)
        seq = meta.get("seq")
        if seq is None:  # written by Celery itself (a bare STARTED): nothing to say
            return None
        if seq <= self._last_seq.get(job_id, 0):
            return None  # already delivered (pub/sub and polling overlap)
        self._last_seq[job_id] = seq
        kind = message_type(meta)
        data = {"type": kind, "job_id": job_id, **self.decorate(job_id, meta)}
        preview = (data.get("preview") or {}).get("image")
        if preview is not None and preview == self._last_preview.get(job_id):
            del data["preview"]  # unchanged since the last message: clients keep the one they have
        elif preview is not None:
            self._last_preview[job_id] = preview
        if state in TERMINAL:
            self._last_seq.pop(job_id, None)
            self._last_preview.pop(job_id, None)
        lite = None
        if kind == "progress" and "preview" in data:
            lite = encode({k: v for k, v in data.items() if k != "preview"})
        return Item(kind, seq, encode(data), lite, data)
