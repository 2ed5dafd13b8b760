"""One way to watch a job, or the feed of every job, for every stream the web tier serves.

The WebSocket routes (:mod:`webapp.ws`), our event stream (:mod:`webapp.sse`) and the
original API's two event streams (:mod:`webapp.original`) all watch the same way, and each
adds only its framing (:mod:`webapp.framing`) and its words:

1. :func:`admit`: a slot of the web process's watcher capacity, or a refusal the route
   turns into its own shape (a 1013 close, a 503 with ``Retry-After``);
2. :func:`subscribed`: the hub's subscription *before* the snapshot is read, so no update
   falls between the two;
3. the snapshot, in the route's framing;
4. every update after the snapshot's ``seq``, with a keep-alive while idle, to the end:
   :func:`updates` for a route that frames each update itself, or :func:`pump` when the
   hub writes the frames straight to a connection the route hands over (WebSockets, and
   event streams under gunicorn);
5. the end: after the final update, when the client is gone, or on overflow (a client this
   far behind reconnects and starts again from a fresh snapshot); then unsubscribe and
   release the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tasks.protocol import Keys

from .hub import JobHub
from .outbox import Item, Outbox

#: Seconds a refused watcher is told to wait (503 ``Retry-After``, the 1013 close reason).
RETRY_AFTER = 5
#: Seconds between keep-alives on an idle stream (under common proxy and client read
#: timeouts of 10 s and more).
KEEP_ALIVE = 8.0
#: What a watcher over capacity is told.
AT_CAPACITY = f"server at watcher capacity: try again in {RETRY_AFTER} s"
AT_CAPACITY_HEADERS = {"Retry-After": str(RETRY_AFTER)}


def admit(hub: JobHub) -> Callable[[], None] | None:
    """A stream slot and the function that releases it (once, however often it is called),
    or None when the web process is at its watcher capacity."""
    if not hub.admit():
        return None
    done = False

    def release() -> None:
        nonlocal done
        if not done:
            done = True
            hub.release()

    return release


@contextmanager
def subscribed(hub: JobHub, job_id: str | None = None,
               accept: Callable[[Item], bool] | None = None) -> Iterator[Outbox]:  # fmt: skip
    """An outbox subscribed to one job's updates, or (``job_id`` None) to the feed of every
    job's events, filtered by ``accept``; unsubscribed on exit."""
    outbox = hub.new_outbox(accept)
    if job_id is not None:
        hub.watch_job(job_id, outbox)
    else:
        hub.watch(Keys.EVENTS, outbox)
    try:
        yield outbox
    finally:
        if job_id is not None:
            hub.unwatch_job(job_id, outbox)
        else:
            hub.unwatch(Keys.EVENTS, outbox)


def updates(outbox: Outbox, after_seq: int = 0, keep_alive: float = KEEP_ALIVE) -> Iterator[Item | None]:
    """Every update after ``after_seq`` (updates without a ``seq``, the feed's, all), and
    None after each ``keep_alive`` seconds without one; ends on overflow.  The caller stops
    after the final update."""
    last = after_seq
    while not outbox.overflowed:
        item = outbox.get(timeout=keep_alive)
        if item is None:
            yield None
        elif not item.seq or item.seq > last:
            last = max(last, item.seq)
            yield item


def pump(outbox: Outbox, sent_seq: int, on_idle: Callable[[], bool], idle_seconds: Callable[[], float],
         until_final: bool = True) -> str:  # fmt: skip
    """The hub writes the updates after ``sent_seq`` straight to the connection the outbox
    owns; here, what it could not write, and ``on_idle()`` (a ping, a keep-alive; False when
    the client is gone) after ``idle_seconds()`` without an update.  Returns why it ended:
    ``final`` (only with ``until_final``), ``dead`` (the client went away) or ``overflow``;
    the producer writes nothing more after it returns."""
    outbox.attach(sent_seq)
    try:
        while True:
            state = outbox.drain(timeout=max(0.0, idle_seconds()))
            if state in ("overflow", "dead") or (state == "final" and until_final):
                return state
            if state == "idle" and not on_idle():
                return "dead"
    finally:
        outbox.detach()
