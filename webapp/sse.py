"""Server-sent events: our job stream ``GET /api/jobs/<id>/events`` and what every SSE route shares.

An SSE watcher is a watcher like a WebSocket one.  It takes one of the web process's stream
slots (:meth:`webapp.hub.JobHub.admit`); over capacity the request is answered at once
with 503 and ``Retry-After``, before any byte of the stream.  Our stream sends the same
messages as ``/ws/jobs/<id>``: the snapshot first, then each update as ``id: <seq>``,
``event: <type>``, ``data: <the same JSON>``; it ends after ``final``.  The slot is
released when the server closes the response, however the stream ended.

Under gunicorn the stream's updates after the snapshot are written by the hub straight to
the connection (chunk-framed over HTTP/1.1, as they are over HTTP/1.0), as WebSocket frames are
(:meth:`webapp.outbox.Outbox.own_stream`): passing every update through the generator,
Werkzeug and gunicorn cost each SSE watcher four times what a WebSocket costs (profiled at
2,000 watchers).  Other servers get the same bytes through the generator.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Request, Response, stream_with_context

from tasks.protocol import TERMINAL, JobState, encode

from .hub import JobHub
from .outbox import Outbox, http_chunk, sse_event

#: Seconds a refused watcher is told to wait (503 ``Retry-After``, the 1013 close reason).
RETRY_AFTER = 5
#: Seconds between keep-alive comments on an idle stream (under common proxy and client
#: read timeouts of 10 s and more).
KEEP_ALIVE = 8.0
KEEP_ALIVE_EVENT = ": keep-alive\n\n"  # a comment line: clients ignore it


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


def connection(request: Request) -> tuple[Any, bool] | None:
    """The connection under this GET's response, and whether gunicorn frames the body as
    HTTP/1.1 chunks (it does without Content-Length; HTTP/1.0 gets the bytes as they are);
    None under other servers."""
    env = request.environ
    sock = env.get("gunicorn.socket")
    if sock is None or env.get("REQUEST_METHOD") != "GET" or env.get("SERVER_PROTOCOL") not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    return sock, env["SERVER_PROTOCOL"] == "HTTP/1.1"


def _pump(outbox: Outbox, conn: tuple[Any, bool], sent_seq: int) -> None:
    """Own the connection (see :func:`connection`) from the snapshot on: the hub writes to it
    directly; here what it could not, keep-alives on an idle stream, and the end after the
    final (or when the client is gone or too far behind)."""
    sock, chunked = conn
    outbox.own_stream(sock, chunked)
    keep_alive = http_chunk(KEEP_ALIVE_EVENT.encode()) if chunked else KEEP_ALIVE_EVENT.encode()
    outbox.attach(sent_seq)
    try:
        while (state := outbox.drain(timeout=KEEP_ALIVE)) not in ("final", "dead", "overflow"):
            if state == "idle":
                outbox.write_external(keep_alive)
        if state == "overflow":  # a client this far behind reconnects to a fresh snapshot
            outbox.write_external(b"")  # first the rest of a chunk the hub began, if any
    except OSError:
        pass  # the client went away during a keep-alive
    finally:
        outbox.detach()


def job_events(svc: Any, job_id: str, conn: tuple[Any, bool] | None = None) -> Iterator[str | bytes]:
    """Our job stream's events (the caller has checked the job exists and may be seen);
    ``conn``: see :func:`connection`."""
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
        if conn is not None:  # the server has written the snapshot: ours from here on
            _pump(outbox, conn, last)
            return
        while not outbox.overflowed:  # a client this far behind reconnects and gets a fresh snapshot
            item = outbox.get(timeout=KEEP_ALIVE)
            if item is None:
                yield KEEP_ALIVE_EVENT
            elif not item.seq or item.seq > last:
                last = max(last, item.seq)
                yield item.event
                if item.kind == "final":
                    return
    finally:
        hub.unwatch_job(job_id, outbox)
