"""Server-sent events: our job stream ``GET /api/jobs/<id>/events`` and what every SSE route shares.

An SSE watcher is a watcher like a WebSocket one.  It takes one of the web process's stream
slots (:meth:`webapp.hub.JobHub.admit`); over capacity the request is answered at once
with 503 and ``Retry-After``, before any byte of the stream.  Our stream sends the same
messages as ``/ws/jobs/<id>``: the snapshot first, then each update as ``id: <seq>``,
``event: <type>``, ``data: <the same JSON>``; it ends after ``final``.  The slot is
released when the server closes the response, however the stream ended.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, stream_with_context

from tasks.protocol import TERMINAL, JobState, encode

from .hub import JobHub
from .outbox import sse_event

#: Seconds a refused watcher is told to wait (503 ``Retry-After``, the 1013 close reason).
RETRY_AFTER = 5
#: Seconds between keep-alive comments on an idle stream (under common proxy and client
#: read timeouts of 10 s and more).
KEEP_ALIVE = 8.0


def event(kind: str | None, data: Any, seq: int | None = None) -> str:
    """One SSE event; ``data`` is sent as is when it is a string (already encoded JSON)."""
    return sse_event(kind, data if isinstance(data, str) else json.dumps(data, separators=(",", ":")), seq)


def admit(hub: JobHub, refuse: Callable[[str, dict[str, str]], Exception]) -> Callable[[], None]:
    """A stream slot, or raise ``refuse(message, headers)`` (the route's own error shape).
    Returns the release to hand to :func:`stream`."""
    if not hub.admit():
        raise refuse(f"server at watcher capacity: try again in {RETRY_AFTER} s", {"Retry-After": str(RETRY_AFTER)})
    done = False

    def release() -> None:
        nonlocal done
        if not done:
            done = True
            hub.release()

    return release


def stream(events: Iterator[str | bytes], release: Callable[[], None]) -> Response:
    resp = Response(stream_with_context(events), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    resp.call_on_close(release)
    return resp


def job_events(svc: Any, job_id: str) -> Iterator[str | bytes]:
    """Our job stream's events (the caller has checked the job exists and may be seen)."""
    hub = svc.hub
    outbox = hub.new_outbox()
    hub.watch_job(job_id, outbox)  # subscribe first, then snapshot: nothing falls between
    try:
        view = svc.view(job_id)
        yield event("snapshot", encode({"type": "snapshot", "job_id": job_id, "seq": view["seq"], "job": view}),
                    view["seq"])  # fmt: skip
        if JobState(view["state"]) in TERMINAL:
            yield event("final", encode(svc.final_message(job_id, view)), view["seq"])
            return
        last = view["seq"]
        while not outbox.overflowed:  # a client this far behind reconnects and gets a fresh snapshot
            item = outbox.get(timeout=KEEP_ALIVE)
            if item is None:
                yield ": keep-alive\n\n"
            elif not item.seq or item.seq > last:
                last = max(last, item.seq)
                yield item.event
                if item.kind == "final":
                    return
    finally:
        hub.unwatch_job(job_id, outbox)
