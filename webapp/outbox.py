"""One watcher's outbox: frames built once, written without blocking, latest preview wins.

Frames are built once per message for every watcher (:mod:`webapp.framing`): a WebSocket
text frame, or a server-sent event (:attr:`Item.frame`, :attr:`Item.event`, and
:attr:`Item.chunk` for an event stream written straight to its socket).  Updates that arrive
together go out together (:class:`Batch`): one write per watcher for all of them, since the
cost of a write is its system call, not its bytes.

This module knows sockets and WebSocket framing, not Redis (:mod:`webapp.hub` feeds it), so
framing, partial sends and slow readers are tested over a socketpair alone.  It works the
same under gunicorn's gevent worker (the default web server) and under threads: the
producer's direct write is a non-blocking send on the connection's underlying OS socket
(:func:`nonblocking`), so the hub's reader never waits for one slow watcher.
"""

from __future__ import annotations

import _socket
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .framing import PING_FRAME, http_chunk, sse_event, text_frame


def greenlets_only() -> bool:
    """True when threading is gevent's (monkey-patched): "threads" are greenlets of one thread."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def nonblocking(sock: Any) -> Any:
    """The OS-level socket of a connection, for a send that must never wait.

    A stdlib socket honours ``MSG_DONTWAIT``.  A gevent socket (gunicorn's gevent worker)
    would instead yield until the peer reads; its ``_sock`` is the underlying non-blocking
    ``_socket.socket``, which raises ``BlockingIOError`` at once, as wanted."""
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, _socket.socket) else sock


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

    @cached_property
    def event(self) -> bytes:
        """The message as an SSE event, built once for every event-stream watcher."""
        return sse_event(self.kind, self.text, self.seq).encode()

    @cached_property
    def chunk(self) -> bytes:
        return http_chunk(self.event)

    @property
    def items(self) -> tuple[Item, ...]:
        return (self,)


@dataclass
class Batch:
    """Updates of one channel that arrived together, in order: each wire form is joined once
    for every watcher, which then takes them in a single write."""

    items: tuple[Item, ...]

    @cached_property
    def frame(self) -> bytes:
        return b"".join(item.frame for item in self.items)

    @cached_property
    def event(self) -> bytes:
        return b"".join(item.event for item in self.items)

    @cached_property
    def chunk(self) -> bytes:
        return http_chunk(self.event)


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
        self.wire = "frame"  # the attribute of an Item or Batch that is written: frame, event or chunk
        # Under gevent (gunicorn's gevent worker) the producer's put runs to its end before any
        # other greenlet: its direct send is on the OS socket and never yields.  Its two locks
        # would only cost time (half of a fan-out's Python work per watcher, gevent's locks
        # being Python code; measured), so it takes neither; a socket's handler mid-write
        # still holds write_lock, which the producer looks at.  Threads take both.
        self._greenlets = greenlets_only()
        self._items: deque[Item] = deque()
        self.stats = stats if stats is not None else {}
        self._cond = threading.Condition(threading.Lock())  # never re-entered: a plain lock is cheaper
        self.limit = limit
        self.overflowed = False
        self.write_lock = threading.Lock()  # every write to the socket holds it: frames never interleave
        self._raw: socket.socket | None = None  # the connection, once owned
        self._nb: Any = None  # its OS-level socket, for the producer's non-blocking sends
        self._sock: Any = None  # set (to _nb) while the producer may write directly
        self._partial = b""  # the unsent tail of a frame the producer began (goes out first)
        self.sent_seq = 0
        self.final_sent = False
        self.dead = False

    # -- producer side --------------------------------------------------------------------
    def put(self, msg: Item | Batch) -> bool:
        """Deliver or queue ``msg`` (one update or several in order); True when the socket's
        thread has work (call :meth:`wake`).

        The producer wakes threads only after it has offered a message to every watcher,
        so hundreds of waking threads never slow the direct writes to the rest."""
        every = items = msg.items
        if self.accept is not None:
            items = tuple(item for item in items if self.accept(item))
            if not items:
                return False
        if self._greenlets:  # nothing else runs until we return: see __init__
            return self._put(msg, every, items)
        with self._cond:
            return self._put(msg, every, items)

    def _put(self, msg: Item | Batch, every: tuple[Item, ...], items: tuple[Item, ...]) -> bool:
        """``put`` under the lock (or alone); ``every``: all of ``msg``'s items, ``items``:
        those this watcher accepts.  Short on purpose: it runs once per watcher per update."""
        if self._sock is not None and not (self._items or self._partial or self.dead):
            if len(items) == 1:
                fresh = items if not items[0].seq or items[0].seq > self.sent_seq else ()
            else:
                fresh = tuple(item for item in items if not item.seq or item.seq > self.sent_seq)
            if not fresh:
                return False
            # the bytes shared by every watcher, unless this one takes only some of them
            data = getattr(msg if len(fresh) == len(every) else Batch(fresh), self.wire)
            if self._send_now(data, fresh):
                return bool(self._partial) or self.dead or self.final_sent
        for item in items:
            self._queue(item)
        return True

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _send_now(self, data: bytes, items: tuple[Item, ...]) -> bool:
        """Write ``data`` (``items`` on the wire) without blocking; False if the socket took
        none of it."""
        if self._greenlets:  # no other greenlet can start a write before this send returns
            return False if self.write_lock.locked() else self._send(data, items)
        if not self.write_lock.acquire(blocking=False):
            return False  # someone is writing: queue instead
        try:
            return self._send(data, items)
        finally:
            self.write_lock.release()

    def _send(self, data: bytes, items: tuple[Item, ...]) -> bool:
        try:
            n = self._sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            self.dead = True
            return True
        for item in items:
            self._mark_sent(item)
        if n < len(data):  # the rest goes before any other write (see write_external)
            self._partial = data[n:]
        return True

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
        self._nb = nonblocking(self._raw)

    def own_stream(self, sock: Any, chunked: bool) -> None:
        """Write an event stream to its connection ourselves (nobody else writes to it until
        the response ends), as HTTP/1.1 chunks or, for HTTP/1.0, as they are; see
        :func:`webapp.sse.job_events`."""
        self._raw = sock
        self._nb = nonblocking(sock)
        self.wire = "chunk" if chunked else "event"

    def attach(self, sent_seq: int) -> None:
        """Allow direct writes once the snapshot (seq ``sent_seq``) is on the wire."""
        with self._cond:
            self.sent_seq = max(self.sent_seq, sent_seq)
            self._sock = self._nb
            self._cond.notify()

    def write_external(self, data: bytes) -> None:
        """simple-websocket's own writes (pongs, the answer to a close) and our pings.  The
        socket's handler is woken after each: after a close it has nothing left to wait for."""
        with self.write_lock:
            with self._cond:
                tail, self._partial = self._partial, b""
            self._raw.sendall(tail + data)
        with self._cond:
            self._cond.notify()

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
                    data = getattr(item, self.wire)
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
