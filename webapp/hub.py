"""One reader per web process, fanning every job update out to all its watchers.

Celery's Redis backend PUBLISHes every ``update_state`` on ``celery-task-meta-<id>``.  A
single thread per web process holds one pub/sub connection, subscribes to the channels
of the jobs someone watches (plus the all-jobs feed), decodes and encodes each update
*once*, and appends it to every watcher's :class:`Outbox`.  Redis work per update is
therefore the same for 1 or 1,000 watchers.  Each socket's own thread drains its outbox,
so a watcher that stops reading only ever delays itself: pending previews are replaced by
newer ones (latest wins) while progress, section and final messages are kept.

A polling fallback (GET of the meta key every few seconds for watched jobs) covers
updates published while the subscription was being (re)established.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis

from tasks.protocol import CELERY_META_PREFIX, TERMINAL, Keys, encode, message_type, parse_celery_payload

log = logging.getLogger("framepack.hub")


def text_frame(text: str) -> bytes:
    """A complete, unmasked WebSocket text frame (server to client; no extensions)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 1 << 16:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


PING_FRAME = bytes((0x89, 0))


@dataclass
class Item:
    """One message for watchers: encoded once (text and wire frame), shared by every outbox."""

    kind: str
    seq: int
    text: str
    lite: str | None = None  # the same message without its preview (for slow sockets)
    data: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def frame(self) -> bytes:
        return text_frame(self.text)


class Outbox:
    """One watcher's messages.  The producer (the hub's reader thread) never blocks on it.

    With a socket attached, a message the socket can take at once is written by the
    producer itself, a single non-blocking send of the pre-built frame: no thread wake-up
    per watcher, which is what keeps hundreds of watchers fast.  Whatever does not fit
    (a slow or stalled reader) waits here for the socket's own thread, and while it waits a
    newer preview replaces the pending ones (latest wins); progress, section and final
    messages are kept.  Without a socket (SSE) everything waits here for :meth:`get`.

    ``accept`` filters what this watcher may see (the all-jobs feed shows a user only its
    own jobs); it runs on the producer's thread, so it must be quick.
    """

    def __init__(self, limit: int = 2000, stats: dict[str, int] | None = None,
                 accept: Callable[[Item], bool] | None = None):  # fmt: skip
        self.accept = accept
        self._items: deque[Item] = deque()
        self.stats = stats if stats is not None else {}
        self._cond = threading.Condition()
        self.limit = limit
        self.overflowed = False
        self.write_lock = threading.Lock()  # every write to the socket holds it: frames never interleave
        self._raw: socket.socket | None = None  # the connection, once owned
        self._sock: socket.socket | None = None  # set while the producer may write directly
        self._partial = b""  # the unsent tail of a frame the producer began (goes out first)
        self.sent_seq = 0
        self.final_sent = False
        self.dead = False

    # -- producer side --------------------------------------------------------------------
    def put(self, item: Item) -> bool:
        """Deliver or queue ``item``; True when the socket's thread has work (call :meth:`wake`).

        The producer wakes threads only after it has offered a message to every watcher,
        so hundreds of waking threads never slow the direct writes to the rest."""
        if self.accept is not None and not self.accept(item):
            return False
        with self._cond:
            if self._sock is not None and not (self._items or self._partial or self.dead):
                if item.seq and item.seq <= self.sent_seq:
                    return False
                if self._send_now(item):
                    return bool(self._partial) or self.dead or item.kind == "final"
            self._queue(item)
            return True

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _send_now(self, item: Item) -> bool:
        """Write ``item`` without blocking; False if the socket took none of it."""
        if not self.write_lock.acquire(blocking=False):
            return False  # someone is writing: queue instead
        try:
            frame = item.frame
            try:
                n = self._sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError:
                self.dead = True
                return True
            self._mark_sent(item)
            if n < len(frame):  # the rest goes before any other write (see write_external)
                self._partial = frame[n:]
            return True
        finally:
            self.write_lock.release()

    def _mark_sent(self, item: Item) -> None:
        self.sent_seq = max(self.sent_seq, item.seq)
        if item.kind == "final":
            self.final_sent = True

    def _queue(self, item: Item) -> None:
        if item.lite is not None:  # a newer preview makes pending ones stale
            for i, old in enumerate(self._items):
                if old.lite is not None:
                    self._items[i] = Item(old.kind, old.seq, old.lite, None, old.data)
                    self.stats["dropped_previews"] = self.stats.get("dropped_previews", 0) + 1
        self._items.append(item)
        if len(self._items) > self.limit and not self.overflowed:
            self.overflowed = True
            self.stats["overflowed"] = self.stats.get("overflowed", 0) + 1

    # -- the socket's own thread ------------------------------------------------------------
    def own(self, ws: Any) -> None:
        """Route every other write to this connection through our lock.

        simple-websocket's reader thread answers a client's pings (and close frames) by
        writing to its socket; without the lock such a write could land in the middle of a
        frame that a congested socket is still taking."""
        self._raw = ws.sock
        ws.sock = LockedSocket(ws.sock, self)

    def attach(self, sent_seq: int) -> None:
        """Allow direct writes once the snapshot (seq ``sent_seq``) is on the wire."""
        with self._cond:
            self.sent_seq = max(self.sent_seq, sent_seq)
            self._sock = self._raw
            self._cond.notify()

    def write_external(self, data: bytes) -> None:
        with self.write_lock:
            with self._cond:
                tail, self._partial = self._partial, b""
            self._raw.sendall(tail + data)

    def detach(self) -> None:
        """No more writes from the producer (wait for one in progress to end)."""
        with self._cond:
            self._sock = None
        with self.write_lock:
            pass

    def drain(self, timeout: float) -> str:
        """Write what is pending (blocking).  Returns ``final`` once the final message is
        out, ``overflow``, ``dead``, ``sent`` or ``idle`` (nothing came within ``timeout``)."""
        with self._cond:
            if not (self._partial or self._items or self.final_sent or self.dead or self.overflowed):
                self._cond.wait(timeout)
            if self.overflowed:
                return "overflow"
            if self.dead:
                return "dead"
            if not (self._partial or self._items):
                return "final" if self.final_sent else "idle"
        with self.write_lock:  # taken before the queue, so the producer cannot overtake us
            with self._cond:
                if self._partial:
                    data, item, self._partial = self._partial, None, b""
                elif self._items:
                    item = self._items.popleft()
                    if item.seq and item.seq <= self.sent_seq:
                        return "sent"
                    data = item.frame
                else:
                    return "sent"
            try:
                self._raw.sendall(data)
            except OSError:
                self.dead = True
                return "dead"
            if item is not None:
                with self._cond:
                    self._mark_sent(item)
        with self._cond:
            return "final" if self.final_sent and not self._items and not self._partial else "sent"

    def ping(self) -> None:
        self.write_external(PING_FRAME)

    def get(self, timeout: float) -> Item | None:
        """For consumers without a socket (SSE): the next pending message."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None


class LockedSocket:
    """The connection as simple-websocket sees it once an :class:`Outbox` owns it: its
    writes go through the outbox (after any unfinished frame); everything else passes."""

    def __init__(self, sock: socket.socket, outbox: Outbox):
        self._sock = sock
        self._outbox = outbox

    def send(self, data: bytes, *_flags: int) -> int:
        self._outbox.write_external(data)
        return len(data)

    def sendall(self, data: bytes, *_flags: int) -> None:
        self._outbox.write_external(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


Transform = Callable[[str, dict[str, Any]], dict[str, Any]]


class JobHub:
    def __init__(self, redis_url: str, decorate: Transform, poll_interval: float = 2.0, metrics: Any = None):
        """``decorate(job_id, meta)`` adds URLs etc. to a meta before it is encoded;
        ``metrics`` (:class:`webapp.metrics.WebMetrics`) counts watchers and preview latency."""
        self.metrics = metrics
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
        self.stats = {"messages": 0, "polls": 0, "delivered": 0, "dropped_previews": 0, "overflowed": 0}

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
        while True:
            while self._changes:
                op, channel = self._changes.popleft()
                (ps.subscribe if op == "sub" else ps.unsubscribe)(channel)
                if op == "sub":
                    self._poll([channel])
            msg = ps.get_message(timeout=0.05)
            if msg is None:
                pass
            elif msg["type"] == "message":
                self._dispatch(msg["channel"].decode(), msg["data"], live=True)
            elif msg["type"] == "subscribe":
                with self._lock:
                    confirmed = self._subscribed.get(msg["channel"].decode())
                if confirmed is not None:
                    confirmed.set()
            if time.monotonic() >= next_poll:
                with self._lock:
                    watched = list(self._watchers)
                self._poll(watched)
                next_poll = time.monotonic() + self.poll_interval

    def _poll(self, channels: list[str]) -> None:
        keys = [c for c in channels if c.startswith(CELERY_META_PREFIX)]
        if not keys:
            return
        self.stats["polls"] += 1
        for channel, raw in zip(keys, self.redis.mget(keys), strict=True):
            if raw is not None:
                self._dispatch(channel, raw)

    def _dispatch(self, channel: str, raw: bytes, live: bool = False) -> None:
        """``live``: just published (a poll's re-read of an older update is not latency)."""
        if channel.startswith(CELERY_META_PREFIX):
            item = self._job_item(channel[len(CELERY_META_PREFIX) :], raw)
        else:
            item = Item("jobs", 0, raw.decode(), None, json.loads(raw))
        if item is None:
            return
        self.stats["messages"] += 1
        with self._lock:
            outboxes = list(self._watchers.get(channel, ()))
        to_wake = [box for box in outboxes if box.put(item)]
        for box in to_wake:
            box.wake()
        self.stats["delivered"] += len(outboxes)
        if live and outboxes and self.metrics is not None and item.data.get("preview") and item.data.get("emitted_at"):
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
