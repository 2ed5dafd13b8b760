"""Slow request bodies cost a client its own time, never the web tier's.

A request with a body (an upload) is admitted only while its address has fewer than
``max_uploads_per_address`` and its token fewer than ``max_uploads_per_token`` uploads in
flight in this process (429 with ``Retry-After`` otherwise, before a byte of the body is
read), and its body must arrive within ``BODY_GRACE_S`` plus its length at
``body_min_rate`` bytes per second (408 otherwise).  The body is read here, whole, before
the application sees the request, so a view never blocks on a client that stopped sending.

Before this, 10,100 ``POST``s that announced a 1 MB body and sent a byte every 8 s held every
connection slot of a web process (``/healthz`` timed out for as long as they stayed), and one
valid token could do the same.  A reverse proxy that buffers bodies (nginx's default) does
this job too and is recommended in front (docs/deploy.md); this is for when there is none.
Reads that would block yield to other greenlets under gevent; the deadline is a
``gevent.Timeout`` there, and a socket timeout elsewhere is the server's business.
"""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

#: Every body gets this long at least (a phone on a bad network, TLS set-up).
BODY_GRACE_S = 10.0
#: Read in pieces of this size (the deadline is checked between them, too).
CHUNK = 64 * 1024


class BodyGuard:
    """WSGI middleware: admission per address and token, then the body within its deadline."""

    def __init__(self, app: Callable[..., Any], *, per_address: int, per_token: int, min_rate: float,
                 max_bytes: int):  # fmt: skip
        self.app = app
        self.per_address = per_address
        self.per_token = per_token
        self.min_rate = min_rate
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.in_flight: Counter[str] = Counter()
        self.stats = {"refused_address": 0, "refused_token": 0, "timed_out": 0}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = _length(environ)
        if length is None:  # no body (GET, HEAD...): nothing to guard
            return self.app(environ, start_response)
        keys = [f"addr:{environ.get('REMOTE_ADDR', '')}"]
        token = _token(environ)
        if token:
            keys.append(f"token:{token}")
        refused = self._admit(keys)
        if refused:
            self.stats[f"refused_{refused}"] += 1
            limit = self.per_address if refused == "address" else self.per_token
            return _error(environ, start_response, 429, f"body: at most {limit} uploads in flight per {refused}; "
                          "retry when one has finished", {"Retry-After": "2", "Connection": "close"})  # fmt: skip
        try:
            try:
                body = self._read(environ, length)
            except TimeoutError:
                self.stats["timed_out"] += 1
                deadline = self.deadline(length)
                return _error(environ, start_response, 408, f"body: not received within {deadline:.0f} s (at least "
                              f"{self.min_rate / 1024:.0f} KiB/s after {BODY_GRACE_S:.0f} s)",
                              {"Connection": "close"})  # fmt: skip
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            return self.app(environ, start_response)
        finally:
            self._release(keys)

    def deadline(self, length: int) -> float:
        return BODY_GRACE_S + length / self.min_rate

    def _admit(self, keys: list[str]) -> str | None:
        with self._lock:
            for key in keys:
                limit = self.per_address if key.startswith("addr:") else self.per_token
                if limit and self.in_flight[key] >= limit:
                    return "address" if key.startswith("addr:") else "token"
            for key in keys:
                self.in_flight[key] += 1
        return None

    def _release(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self.in_flight[key] -= 1
                if self.in_flight[key] <= 0:
                    del self.in_flight[key]

    def _read(self, environ: dict[str, Any], length: int) -> bytes:
        """The whole body (at most ``max_bytes + 1``: Flask answers 413 beyond), or TimeoutError."""
        want = min(length, self.max_bytes + 1) if length >= 0 else self.max_bytes + 1
        stream = environ["wsgi.input"]
        parts: list[bytes] = []
        got = 0
        with _timeout(self.deadline(want)):
            while got < want:
                piece = stream.read(min(CHUNK, want - got))
                if not piece:
                    break
                parts.append(piece)
                got += len(piece)
        return b"".join(parts)


@contextmanager
def _timeout(seconds: float):
    """Raise TimeoutError when the block runs past ``seconds`` (gevent: even inside a blocked read)."""
    from .outbox import greenlets_only

    if not greenlets_only():
        yield
        return
    import gevent

    timer = gevent.Timeout(seconds, TimeoutError)
    timer.start()
    try:
        yield
    finally:
        timer.close()


def _length(environ: dict[str, Any]) -> int | None:
    """The announced body length, -1 for a chunked body, None for no body."""
    if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        return -1
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    return length if length > 0 else None


def _token(environ: dict[str, Any]) -> str:
    header = environ.get("HTTP_AUTHORIZATION", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return ""


def _error(environ: dict[str, Any], start_response: Callable[..., Any], status: int, message: str,
           headers: dict[str, str]) -> list[bytes]:  # fmt: skip
    """Our error shape (and FastAPI's ``detail`` on the original API's routes), outside Flask."""
    body: dict[str, Any] = {"error": message, "field": "body", "errors": [{"field": "body", "message": message}]}
    if not environ.get("PATH_INFO", "").startswith(("/api/", "/ws/")):
        body["detail"] = message
    data = json.dumps(body).encode()
    reason = {408: "Request Timeout", 429: "Too Many Requests"}[status]
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                                          *headers.items()])  # fmt: skip
    return [data]


__all__ = ["BODY_GRACE_S", "BodyGuard"]
