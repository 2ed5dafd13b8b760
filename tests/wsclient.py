"""Small blocking watchers for tests: WebSocket (simple-websocket's client) and SSE (httpx)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import simple_websocket


class Watcher(threading.Thread):
    """Connects to a job stream and records every message until the final one (or close)."""

    def __init__(self, url: str, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.url, self.timeout = url, timeout
        self.messages: list[dict] = []
        self.received_at: list[float] = []
        self.closed: tuple | None = None
        self.error: BaseException | None = None
        self.connected = threading.Event()
        self.first_update = threading.Event()
        self.got_section = threading.Event()

    def run(self) -> None:
        try:
            ws = simple_websocket.Client.connect(self.url)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.connected.set()
            return
        self.connected.set()
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                raw = ws.receive(timeout=1)
                if raw is None:
                    continue
                msg = json.loads(raw)
                self.messages.append(msg)
                self.received_at.append(time.time())
                if msg["type"] != "snapshot":
                    self.first_update.set()
                if msg["type"] == "section":
                    self.got_section.set()
                if msg["type"] == "final":
                    break
        except simple_websocket.ConnectionClosed as exc:
            self.closed = (exc.reason, exc.message)
        finally:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages if m["type"] != "snapshot"]

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]


def watch(url: str, timeout: float = 120.0) -> Watcher:
    w = Watcher(url, timeout)
    w.start()
    w.connected.wait(10)
    return w


class SseWatcher(Watcher):
    """The same over ``GET /api/jobs/<id>/events``: records each event's JSON, and each
    event's ``id:`` and ``event:`` lines (``fields``); ``ended`` is set only when the server
    ended the stream cleanly (the chunked body's last chunk arrived)."""

    def __init__(self, url: str, timeout: float = 120.0):
        super().__init__(url, timeout)
        self.fields: list[dict[str, str]] = []
        self.ended = False

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=self.timeout, trust_env=False) as resp:
                self.connected.set()
                fields: dict[str, str] = {}
                for line in resp.iter_lines():
                    if line:
                        name, _, value = line.partition(": ")
                        fields[name] = value
                        continue
                    if "data" in fields:
                        msg = json.loads(fields["data"])
                        self.messages.append(msg)
                        self.fields.append(fields)
                        self.received_at.append(time.time())
                        if msg["type"] == "section":
                            self.got_section.set()
                    fields = {}
                self.ended = True
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.connected.set()


def watch_sse(url: str, timeout: float = 120.0) -> SseWatcher:
    w = SseWatcher(url, timeout)
    w.start()
    w.connected.wait(10)
    return w
