"""A real little webhook receiver on loopback for tests: records every POST, can fail on purpose."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


class Receiver:
    """``http://127.0.0.1:<port>/hook``.  ``fail`` maps an event type (``job.start``...) to how
    many of its first deliveries answer 500; every request is recorded (failed ones too)."""

    def __init__(self, port: int = 0, fail: dict[str, int] | None = None):
        self.requests: list[dict] = []
        self.fail = dict(fail or {})
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                kind = json.loads(body).get("type")
                with receiver._cond:
                    failing = receiver.fail.get(kind, 0) > 0
                    if failing:
                        receiver.fail[kind] -= 1
                    receiver.requests.append({"headers": dict(self.headers), "body": body, "type": kind,
                                              "answered": 500 if failing else 204, "at": time.time()})  # fmt: skip
                    receiver._cond.notify_all()
                self.send_response(500 if failing else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[dict]:
        """The accepted deliveries, in the order they arrived."""
        with self._cond:
            return [r for r in self.requests if r["answered"] < 300]

    def wait_for(self, predicate, timeout: float, what: str) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {[r['type'] for r in self.requests]}")
                self._cond.wait(left)
            return list(self.requests)

    def verify(self, secret: str, request: dict) -> dict:
        """The payload, if its Standard Webhooks signature is valid (raises otherwise)."""
        return Webhook(secret).verify(request["body"], request["headers"])
