"""Python client for a framepack-celery server: submit, watch with progress bars, download.

    from framepack_client import FramePackClient

    client = FramePackClient("http://127.0.0.1:8000", token="...")   # or $FRAMEPACK_TOKEN
    job = client.submit("photo.jpg", prompt="The girl dances gracefully", total_second_length=5,
                        webhook="https://hooks.example.com/framepack")   # optional, signed callbacks
    final = client.wait(job["id"])          # progress bars on stderr; reconnects by itself
    client.download(job["id"], "out.mp4")

Imports neither torch nor Flask: it speaks the documented REST and WebSocket protocol
(docs/protocol.md) with httpx and simple-websocket.
"""

from __future__ import annotations

import base64
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import simple_websocket

__all__ = ["APIError", "FramePackClient"]

TERMINAL = ("succeeded", "failed", "cancelled")


class APIError(RuntimeError):
    """A 4xx/5xx answer; ``field`` names the offending field when the server said.
    ``not_api``: what answered is not this API (an HTML page, a proxy's error, another
    service): the URL is probably wrong."""

    def __init__(self, status: int, body: dict[str, Any], not_api: bool = False):
        self.status = status
        self.body = body
        self.field = body.get("field")
        self.not_api = not_api
        super().__init__(f"HTTP {status}: {body.get('error', body)}")


class FramePackClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0, token: str | None = None):
        """``token``: the API token when the server requires one (default ``$FRAMEPACK_TOKEN``);
        it goes as ``Authorization: Bearer`` on every request, the WebSocket's included."""
        self.base = base_url.rstrip("/")
        token = token if token is not None else os.environ.get("FRAMEPACK_TOKEN") or None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base, timeout=timeout, headers=self.headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FramePackClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _json(self, resp: httpx.Response) -> Any:
        if not resp.content and resp.status_code < 400:
            return None
        try:
            body = resp.json()
        except ValueError:
            kind = resp.headers.get("content-type", "no content type").split(";")[0]
            raise APIError(resp.status_code, {"error": f"{self.base} answered HTTP {resp.status_code} with {kind}, "
                                                       "not this API's JSON: is the server URL right?"},
                           not_api=True) from None  # fmt: skip
        if resp.status_code >= 400:
            raise APIError(resp.status_code, body if isinstance(body, dict) else {"error": str(body)})
        return body

    # -- REST -----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._json(self.http.get("/api/info"))

    def submit(self, image: str | Path | bytes, end_image: str | Path | bytes | None = None,
               loras: list[str] | None = None, *, webhook: str | None = None,
               webhook_events: list[str] | None = None, **params: Any) -> dict:  # fmt: skip
        """Queue a job; ``params`` are FramePack parameters (see ``/api/openapi.json``),
        ``loras`` are ``"NAME"`` or ``"NAME:WEIGHT"`` (``GET /api/loras`` lists them).

        ``webhook``: a URL the server POSTs signed snapshots to (Standard Webhooks) for
        ``webhook_events`` (``start``, ``section``, ``completed``; default ``completed``)."""
        files = {"image": ("image", _read(image))}
        if end_image is not None:
            files["end_image"] = ("end_image", _read(end_image))
        data: dict[str, Any] = {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in params.items()
                                if v is not None}  # fmt: skip
        if loras:
            data["loras"] = list(loras)
        if webhook is not None:
            data["webhook"] = webhook
        if webhook_events:
            data["webhook_events"] = list(webhook_events)
        return self._json(self.http.post("/api/jobs", files=files, data=data))

    def submit_batch(self, jobs: list[dict[str, Any]], defaults: dict[str, Any] | None = None) -> dict:
        """Queue several jobs as one batch: each entry has an ``image`` (a path or bytes),
        optionally an ``end_image``, and parameters overriding ``defaults``.  Entries the
        server refuses come back in ``errors``; the others run."""
        entries = []
        for job in jobs:
            entry = dict(job)
            for name in ("image", "end_image"):
                if entry.get(name) is not None:
                    entry[name] = base64.b64encode(_read(entry[name])).decode()
            entries.append(entry)
        return self._json(self.http.post("/api/batches", json={"defaults": defaults or {}, "jobs": entries}))

    def extend(self, job_id: str, seconds: float, prompt: str | None = None, **fields: Any) -> dict[str, Any]:
        """A new job continuing a succeeded job's video forward by ``seconds`` (F1)."""
        body = {"seconds": seconds, **fields, **({"prompt": prompt} if prompt is not None else {})}
        return self._json(self.http.post(f"/api/jobs/{job_id}/extend", json=body))

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/api/batches/{batch_id}"))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/api/batches/{batch_id}/cancel"))

    def loras(self) -> list[dict[str, Any]]:
        return self._json(self.http.get("/api/loras"))["loras"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/api/jobs/{job_id}"))

    def jobs(self, offset: int = 0, limit: int = 20) -> dict[str, Any]:
        return self._json(self.http.get("/api/jobs", params={"offset": offset, "limit": limit}))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/api/jobs/{job_id}/cancel"))

    def delete(self, job_id: str) -> None:
        self._json(self.http.delete(f"/api/jobs/{job_id}"))

    def download(self, job_id: str, path: str | Path, section: int | None = None) -> Path:
        """The final video (or the video as written after ``section``) to ``path``."""
        url = f"/api/jobs/{job_id}/video" if section is None else f"/api/jobs/{job_id}/sections/{section}"
        path = Path(path)
        with self.http.stream("GET", url) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._json(resp)
            with path.open("wb") as f:
                for chunk in resp.iter_bytes():
                    f.write(chunk)
        return path

    # -- live -----------------------------------------------------------------------------
    def watch(self, job_id: str, reconnect: bool = True, max_backoff: float = 10.0) -> Iterator[dict[str, Any]]:
        """Every message of the job's stream, ending with ``final``.

        On a dropped connection it reconnects with back-off; the new ``snapshot`` carries
        what was missed that matters (sections, latest preview, progress), and messages
        already seen (by ``seq``) are not repeated."""
        ws_url = self.base.replace("http://", "ws://").replace("https://", "wss://") + f"/ws/jobs/{job_id}"
        last_seq, delay = -1, 0.5
        while True:
            try:
                ws = simple_websocket.Client.connect(ws_url, headers=self.headers)
            except (OSError, simple_websocket.ConnectionError) as exc:
                status = getattr(exc, "status_code", None)
                if status in (401, 403):  # no token, or a wrong one: reconnecting will not help
                    raise APIError(status, {"error": f"the server refused the stream (HTTP {status}): check the API "
                                                     "token (--token / FRAMEPACK_TOKEN)", "field": "authorization"}
                                   ) from None
                if not reconnect:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, max_backoff)
                continue
            delay = 0.5
            try:
                while True:
                    raw = ws.receive(timeout=60)
                    if raw is None:
                        continue
                    msg = json.loads(raw)
                    seq = msg.get("seq", 0)
                    if msg["type"] != "snapshot" and seq <= last_seq:
                        continue
                    last_seq = max(last_seq, seq)
                    yield msg
                    if msg["type"] == "final":
                        return
            except simple_websocket.ConnectionClosed as exc:
                if exc.reason == 4404:
                    raise APIError(404, {"error": f"unknown job {job_id}", "field": "job_id"}) from None
                if not reconnect:
                    raise
                if exc.reason == 1013:  # the server is at its watcher capacity: come back later
                    time.sleep(5 + 5 * random.random())
            finally:
                try:
                    ws.close()
                except simple_websocket.ConnectionClosed:
                    pass  # the server closed it first

    def wait(self, job_id: str, progress: bool = True, previews: str | Path | None = None) -> dict[str, Any]:
        """Block until the job ends; progress bars on stderr; returns the ``final`` message.

        With ``previews`` a directory, every preview strip received is saved there."""
        from tqdm import tqdm

        bar = tqdm(total=100, unit="%", desc="queued", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        sections_seen = 0
        if previews is not None:
            Path(previews).mkdir(parents=True, exist_ok=True)
        try:
            for msg in self.watch(job_id):
                job = msg["job"] if msg["type"] == "snapshot" else msg
                state = job.get("state", "")
                if state == "queued":
                    bar.set_description(f"queued #{job.get('position') or '?'}")
                elif job.get("steps"):
                    where = f"section {job['section']}/{job['sections']} · step {job['step']}/{job['steps']}"
                    bar.set_description(where)
                elif job.get("stage"):
                    bar.set_description(job["stage"])
                pct = 100 if state == "succeeded" else round(100 * (job.get("progress") or 0), 1)
                bar.n = pct
                if job.get("eta") is not None and state not in TERMINAL:
                    bar.set_postfix_str(f"ETA {job['eta']:.0f}s")
                bar.refresh()
                done = job.get("sections_done") or []
                for s in done[sections_seen:]:
                    line = f"section {s['section']}: {s['frames']} frames, {s['seconds']:.2f} s ({s['url']})"
                    bar.write(line, file=sys.stderr)
                sections_seen = max(sections_seen, len(done))
                if previews is not None and job.get("preview"):
                    data = job["preview"]["image"].split(",", 1)[1]
                    Path(previews, f"preview-{job.get('seq', 0):05d}.jpg").write_bytes(base64.b64decode(data))
                if msg["type"] == "final":
                    bar.set_description(state)
                    bar.set_postfix_str("")
                    return msg
        finally:
            bar.close()
        raise RuntimeError("stream ended without a final message")


    def wait_batch(self, batch_id: str, progress: bool = True, every: float = 0.5) -> dict[str, Any]:
        """Block until every job of the batch has ended, one progress bar per job on
        stderr; returns the batch (``GET /api/batches/<id>``)."""
        from tqdm import tqdm

        bars: dict[str, Any] = {}
        try:
            while True:
                batch = self.batch(batch_id)
                for i, job in enumerate(batch["jobs"]):
                    if job["id"] not in bars:
                        bars[job["id"]] = tqdm(total=100, unit="%", position=i, leave=True, disable=not progress,
                                               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
                    bar = bars[job["id"]]
                    state = job["state"]
                    where = f"#{job['position']}" if state == "queued" else (
                        f"section {job['section']}/{job['sections']}" if job.get("sections") else "")  # fmt: skip
                    bar.set_description(f"{job['id'][:8]} {state} {where}".rstrip())
                    bar.n = 100 if state == "succeeded" else round(100 * (job.get("progress") or 0), 1)
                    bar.refresh()
                if batch["done"]:
                    return batch
                time.sleep(every)
        finally:
            for bar in bars.values():
                bar.close()


def _read(source: str | Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()
