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

from collections.abc import Callable, Iterator
from typing import Any

from flask import Request, Response, stream_with_context

from tasks.protocol import TERMINAL, JobState, encode

from . import watch
from .framing import KEEP_ALIVE_EVENT, http_chunk, sse_event
from .outbox import Outbox


def admit(hub: Any, refuse: Callable[[str, dict[str, str]], Exception]) -> Callable[[], None]:
    """A stream slot (:func:`webapp.watch.admit`), or raise ``refuse(message, headers)`` (the
    route's own error shape) before any byte of the stream.  Returns the release to hand to
    :func:`stream`."""
    release = watch.admit(hub)
    if release is None:
        raise refuse(watch.AT_CAPACITY, dict(watch.AT_CAPACITY_HEADERS))
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
    directly (:func:`webapp.watch.pump`); keep-alives on an idle stream."""
    sock, chunked = conn
    outbox.own_stream(sock, chunked)
    keep_alive = http_chunk(KEEP_ALIVE_EVENT.encode()) if chunked else KEEP_ALIVE_EVENT.encode()

    def idle() -> bool:
        try:
            outbox.write_external(keep_alive)
            return True
        except OSError:
            return False  # the client went away

    if watch.pump(outbox, sent_seq, idle, lambda: watch.KEEP_ALIVE) == "overflow":
        try:  # the rest of a chunk the hub began, so the client sees a well-formed end
            outbox.write_external(b"")
        except OSError:
            pass


def job_events(svc: Any, job_id: str, conn: tuple[Any, bool] | None = None) -> Iterator[str | bytes]:
    """Our job stream's events (the caller has checked the job exists and may be seen);
    ``conn``: see :func:`connection`."""
    with watch.subscribed(svc.hub, job_id) as outbox:
        view = svc.snapshot(job_id)
        yield sse_event("snapshot", encode({"type": "snapshot", "job_id": job_id, "seq": view["seq"], "job": view}),
                        view["seq"])  # fmt: skip
        if JobState(view["state"]) in TERMINAL:
            yield sse_event("final", encode(svc.final_message(job_id, view)), view["seq"])
            return
        if conn is not None:  # the server has written the snapshot: ours from here on
            _pump(outbox, conn, view["seq"])
            return
        for item in watch.updates(outbox, view["seq"]):
            yield KEEP_ALIVE_EVENT if item is None else item.event
            if item is not None and item.kind == "final":
                return
