"""Wire framings, as pure functions of bytes and text (tested without sockets).

Every stream sends the same messages (:mod:`tasks.protocol`); only their framing differs:
a WebSocket text frame (:func:`text_frame`, :data:`PING_FRAME`), a server-sent event
(:func:`sse_event`, :data:`KEEP_ALIVE_EVENT`), and, for an event stream written straight
to its connection, an HTTP/1.1 chunk around it (:func:`http_chunk`).
"""

from __future__ import annotations

import json
from typing import Any

#: A WebSocket ping with no payload (server to client).
PING_FRAME = bytes((0x89, 0))
#: An SSE comment line: clients ignore it, proxies see bytes (keep-alive).
KEEP_ALIVE_EVENT = ": keep-alive\n\n"


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


def sse_event(kind: str | None, data: str | Any, seq: int | None = None) -> str:
    """One server-sent event.  ``data`` is sent as is when it is a string (one line: encoded
    JSON or plain text), else encoded as compact JSON."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"id: {seq}\n" if seq else "") + (f"event: {kind}\n" if kind else "") + f"data: {text}\n\n"


def http_chunk(data: bytes) -> bytes:
    """One chunk of an HTTP/1.1 chunked body (what the WSGI server would have framed)."""
    return b"%X\r\n%s\r\n" % (len(data), data)
