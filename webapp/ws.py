"""WebSocket streams (Flask-Sock): ``/ws/jobs/<id>`` and ``/ws/jobs``.

Each socket gets a snapshot, then the hub's messages from its outbox, sent by the
socket's own handler (a greenlet under the default gevent server, a thread under
gthread), so a stalled peer blocks nobody else.  A socket over the web process's watcher
capacity is closed at once with 1013 "try again later" (:data:`CLOSE_TRY_LATER`): a
browser's WebSocket cannot read an HTTP status, but it reads a close code.  Per-message deflate
is refused: base64 JPEGs barely compress and deflate per socket dominated latency at
hundreds of watchers (p99 ~40 ms -> ~350 ms at 500 watchers in a prototype).

With API tokens the handshake is refused with 401 before the upgrade (``webapp.auth``;
browsers add ``?access=<ticket>``); a job the caller may not see closes with 4404, as an
unknown one does, and the all-jobs feed carries only the caller's jobs (admins: all).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from wsproto.events import CloseConnection
from wsproto.utilities import LocalProtocolError

from tasks.protocol import TERMINAL, JobState, encode

from . import watch
from .auth import principal
from .service import Service

sock = Sock()
bp = Blueprint("ws", __name__)

CLOSE_UNKNOWN_JOB = 4404
CLOSE_TOO_SLOW = 4408
CLOSE_DONE = 1000
#: RFC 6455 "Try Again Later": the web process is at its watcher capacity.
CLOSE_TRY_LATER = 1013


def _service() -> Service:
    return current_app.extensions["framepack"]


def refuse_compression() -> None:
    """simple-websocket accepts deflate whenever offered; hiding the offer refuses it."""
    if request.path.startswith("/ws/"):
        request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


def _limit_send_buffer(ws: Any) -> None:
    """Cap the kernel's send buffer of this socket.

    Linux lets a socket buffer up to 4 MB unsent: for a slow watcher that is seconds of
    stale previews queued in the kernel (and 2 GB across 500 watchers).  A small buffer
    makes the send block sooner, so the outbox's latest-wins replaces stale previews
    instead, and that watcher sees the newest frame when it catches up.
    """
    size = current_app.config.get("WS_SEND_BUFFER")
    sock = getattr(ws, "sock", None)
    if size and sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(size))
        except OSError:
            pass


#: Seconds between our pings.  We ping from the socket's own thread (simple-websocket's
#: pinger is off) so that every frame written to a socket goes through the outbox's lock.
PING_SECONDS = 25.0


#: How often an idle socket's handler looks whether its client went away without a close
#: frame (a close frame wakes it at once: see ``Outbox.write_external``).  Waking every
#: socket every second cost thousands of timer and lock allocations a second at 2,000
#: watchers (profiled with py-spy under gevent).
IDLE_CHECK_SECONDS = 5.0


#: After the final message the client usually hangs up itself; closing hundreds of sockets
#: from our side at the very moment the final goes out to all of them competes with that
#: delivery, so we wait this long for the client before closing.
CLOSE_GRACE_SECONDS = 2.0


def _close_after_grace(ws: Any) -> None:
    """Wait for the client's close (simple-websocket sets ``ws.event`` when it arrives:
    no polling, which at thousands of sockets would be tens of thousands of wake-ups), then
    close ourselves if it has not; a client that hangs up in between is not an error."""
    deadline = time.monotonic() + CLOSE_GRACE_SECONDS
    while ws.connected and (left := deadline - time.monotonic()) > 0:
        ws.event.wait(left)
        ws.event.clear()
    if ws.connected:
        try:
            ws.close(reason=CLOSE_DONE, message="job finished")
        except (LocalProtocolError, ConnectionClosed, OSError):
            pass  # the client closed first


def _close_and_linger(ws: Any, reason: int, message: str) -> None:
    """Close with ``reason`` even when simple-websocket already counts the socket as closed
    (its reader stops on any socket error and ``close()`` then sends nothing), then give the
    client up to :data:`CLOSE_GRACE_SECONDS` to hang up before the connection is torn down.
    Both guard the code the client must see: full test runs saw 1005 ("no status") instead of
    4404 now and then, which only a close frame that never left, or was reset away, explains."""
    ws.event.clear()
    try:
        if ws.connected:
            ws.close(reason=reason, message=message)
        else:
            ws.sock.send(ws.ws.send(CloseConnection(code=reason, reason=message)))
    except (LocalProtocolError, ConnectionClosed, OSError):
        return  # the client is gone: nobody to tell
    ws.event.wait(CLOSE_GRACE_SECONDS)


def _pump(ws: Any, outbox: Any, sent_seq: int, until_final: bool) -> None:
    """After the snapshot (:func:`webapp.watch.pump`): ping when idle, close after the final
    (or when too far behind)."""
    next_ping = [time.monotonic() + PING_SECONDS]

    def idle() -> bool:
        if not ws.connected:
            return False
        if time.monotonic() >= next_ping[0]:
            outbox.ping()
            next_ping[0] = time.monotonic() + PING_SECONDS
        return True

    end = watch.pump(outbox, sent_seq, idle, lambda: min(IDLE_CHECK_SECONDS, next_ping[0] - time.monotonic()),
                     until_final)  # fmt: skip
    if end == "overflow":
        ws.close(reason=CLOSE_TOO_SLOW, message="too slow: messages were piling up")
    elif end == "final":
        _close_after_grace(ws)


def _admitted(ws: Any, svc: Service) -> Callable[[], None] | None:
    """A stream slot's release, or None after closing with 1013 at once (the client retries
    after a while)."""
    release = watch.admit(svc.hub)
    if release is None:
        _close_and_linger(ws, CLOSE_TRY_LATER, watch.AT_CAPACITY)
    return release


@sock.route("/ws/jobs/<job_id>", bp=bp)
def job_stream(ws: Any, job_id: str) -> None:
    svc = _service()
    release = _admitted(ws, svc)
    if release is None:
        return
    try:
        _job_stream(ws, svc, job_id)
    finally:
        release()


def _job_stream(ws: Any, svc: Service, job_id: str) -> None:
    record = svc.record(job_id)
    if record is None or not principal().may_see(record.get("owner")):
        _close_and_linger(ws, CLOSE_UNKNOWN_JOB, "unknown job")
        return
    _limit_send_buffer(ws)
    with watch.subscribed(svc.hub, job_id) as outbox:
        outbox.own(ws)
        view = svc.snapshot(job_id)
        ws.send(encode({"type": "snapshot", "job_id": job_id, "seq": view["seq"], "job": view}))
        if JobState(view["state"]) in TERMINAL:
            ws.send(encode(svc.final_message(job_id, view)))
            ws.close(reason=CLOSE_DONE, message="job finished")
            return
        _pump(ws, outbox, view["seq"], until_final=True)


@sock.route("/ws/jobs", bp=bp)
def jobs_stream(ws: Any) -> None:
    svc = _service()
    release = _admitted(ws, svc)
    if release is None:
        return
    who = principal()
    accept = None if who.admin else lambda item: who.may_see(item.data.get("owner"))
    try:
        with watch.subscribed(svc.hub, accept=accept) as outbox:
            outbox.own(ws)
            jobs, _ = svc.list_page(0, 50, None if who.admin else who.name)
            ws.send(encode({"type": "snapshot", "jobs": jobs}))
            _pump(ws, outbox, 0, until_final=False)
    finally:
        release()


def init_app(app: Flask) -> None:
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"ping_interval": None})  # we ping: see PING_SECONDS
    app.before_request(refuse_compression)
    app.register_blueprint(bp)
