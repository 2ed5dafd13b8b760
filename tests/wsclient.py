"""A small blocking WebSocket watcher for tests (simple-websocket's client)."""

from __future__ import annotations

import json
import threading
import time

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
