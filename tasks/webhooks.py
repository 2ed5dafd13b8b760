"""Signed webhooks: which URLs a job may name, what is sent, and the delivery task.

A job may carry ``webhook`` (a URL starting with one of ``FRAMEPACK_WEBHOOK_ALLOW``'s
prefixes, so no request goes to an arbitrary internal address) and ``webhook_events``
(``start``, ``section``, ``completed``; default ``completed``, which covers every end).

Each event is appended to the job's delivery log (``fp:job:<id>:webhook``, a Redis list)
by the transition that caused it, with the job's snapshot of that moment as payload:
``start`` by :meth:`tasks.lifecycle.Lifecycle.start`, ``section`` by the worker's
:class:`tasks.reporter.Reporter` once a section update is written, ``completed`` by
:meth:`tasks.lifecycle.Lifecycle.finish`, in the transaction that writes the final (so it is
logged exactly once).  Then a ``tasks.deliver_webhook`` task on the ``webhooks`` queue — a
small worker of its own, never the GPU worker, so a slow receiver never holds a GPU — POSTs
the log in order, one event at a time per job (a lock), signed per the Standard Webhooks
spec.  A failed delivery is retried with exponential back-off (``FRAMEPACK_WEBHOOK_BACKOFF``,
doubling, at most an hour apart) for ``FRAMEPACK_WEBHOOK_RETRY_SECONDS``, then given up;
the events behind it wait, so a receiver always sees a job's events in order.  Every attempt
is kept in the log, which the job's snapshot shows (``webhook.deliveries``).  A delivery
whose task was lost (broker down when it was sent, a webhook worker killed while it held a
retry) is sent again by the background sweep (``fp:webhooks``: when each job's next delivery
is due).

Torch- and Flask-free: the worker, the webhook worker and the web tier import it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import httpx
import redis
from celery import shared_task
from pydantic import BaseModel, ConfigDict, Field

from .protocol import Keys

log = logging.getLogger("framepack.webhooks")

EVENTS = ("start", "section", "completed")
DEFAULT_EVENTS = ["completed"]
QUEUE = "webhooks"
TASK_NAME = "tasks.deliver_webhook"
#: One POST may take this long (connect + answer).
TIMEOUT = 10.0
#: Retries are never further apart than this (and stay well under the broker's visibility
#: timeout, so a waiting retry is not delivered twice).
MAX_BACKOFF = 3600.0
#: The per-job delivery lock's lifetime; refreshed before every attempt.
LOCK_SECONDS = 60
#: The sweep sends a delivery task again for a job whose delivery is this overdue.
RECOVER_AFTER = 60.0

Event = Literal["start", "section", "completed"]


class WebhookSpec(BaseModel):
    """What a submission may ask: where to be called back, and for which events."""

    model_config = ConfigDict(extra="forbid")

    webhook: str = Field(
        min_length=1,
        max_length=2048,
        title="Webhook",
        description="URL the service POSTs signed job snapshots to (Standard Webhooks); it must start with one "
        "of the server's allowed prefixes (FRAMEPACK_WEBHOOK_ALLOW).",
    )
    webhook_events: list[Event] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=3,
        title="Webhook events",
        description="Which events to POST: start, section (after every section), completed (every end: "
        "succeeded, failed or cancelled).",
    )

    def stored(self) -> dict[str, Any]:
        """What the job record keeps (``webhook`` field): events once each, in their order."""
        return {"url": self.webhook, "events": [e for e in EVENTS if e in self.webhook_events]}


class WebhookRefused(ValueError):
    """A webhook URL this server will not call (400, naming ``webhook``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.field = "webhook"
        self.message = message


def _origin_and_path(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    path = parts.path or "/"
    return f"{parts.scheme.lower()}://{host}{port}", path + (f"?{parts.query}" if parts.query else "")


def _path_problem(path: str) -> str | None:
    """Why a webhook path cannot be compared as text, or None.  HTTP clients (httpx among
    them) resolve ``.`` and ``..`` segments before sending, so ``/hook/../internal`` passed a
    prefix check on ``/hook`` and reached ``/internal``; percent-encoded dots and backslashes
    (which some servers read as ``/``) are the same trick in other clothes."""
    decoded = unquote(path)
    if "\\" in path or "\\" in decoded:
        return "backslashes"
    if any(segment in (".", "..") for segment in decoded.split("/")):
        return "dot segments (. or ..)"
    return None


def check_url(url: str, allow: tuple[str, ...]) -> None:
    """Raise :class:`WebhookRefused` unless ``url`` is an http(s) URL starting with one of
    the ``allow`` prefixes.  Scheme, host and port must equal the prefix's (so
    ``https://hooks.example.com`` does not admit ``https://hooks.example.com.evil.net``);
    the path, free of dot segments and backslashes (raw or percent-encoded), must start with
    the prefix's path.  No user:password in the URL."""
    if not allow:
        raise WebhookRefused("webhook: webhooks are not enabled on this server (FRAMEPACK_WEBHOOK_ALLOW is unset)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises on a bad port
    except ValueError:
        raise WebhookRefused("webhook: not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook: must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise WebhookRefused("webhook: must not carry a user name or password")
    problem = _path_problem(parts.path)
    if problem:
        raise WebhookRefused(f"webhook: the URL's path must not contain {problem}")
    origin, path = _origin_and_path(url)
    for prefix in allow:
        p_origin, p_path = _origin_and_path(prefix)
        if origin == p_origin and path.startswith(p_path):
            return
    raise WebhookRefused(f"webhook: this server only calls URLs starting with {', '.join(allow)}")


def wants(record: dict[str, Any] | None, event: str) -> bool:
    """Whether the job (its decoded record) asked for ``event``."""
    spec = (record or {}).get("webhook")
    return isinstance(spec, dict) and event in spec.get("events", ())


def payload(event: str, view: dict[str, Any]) -> str:
    """The body POSTed: Standard Webhooks' ``{type, timestamp, data}`` with the job's
    snapshot as ``data``, without the preview image (a base64 JPEG nobody wants by mail)
    and without the delivery log itself."""
    data = {k: v for k, v in view.items() if k not in ("preview", "webhook")}
    body = {"type": f"job.{event}", "timestamp": datetime.now(UTC).isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"))


def log_event(pipe: redis.client.Pipeline, job_id: str, event: str, body: str, seq: int, ttl: int) -> None:
    """Append one event to the job's delivery log (in the caller's pipeline or transaction).
    Its id (``webhook-id``) is stable across retries, so a receiver can drop duplicates."""
    now = time.time()
    entry = {"id": f"msg_{job_id}_{event}_{seq}", "event": event, "state": "pending", "created_at": now,
             "next_at": now, "attempts": [], "payload": body}  # fmt: skip
    pipe.rpush(Keys.webhook_log(job_id), json.dumps(entry, separators=(",", ":")))
    pipe.expire(Keys.webhook_log(job_id), ttl)
    pipe.zadd(Keys.WEBHOOKS_DUE, {job_id: now}, nx=True)


def read_log(r: redis.Redis | redis.client.Pipeline, job_id: str) -> Any:
    return r.lrange(Keys.webhook_log(job_id), 0, -1)


def deliveries(raw: list[bytes | str] | None) -> list[dict[str, Any]]:
    """The delivery log as the snapshot shows it (no payloads)."""
    return [{k: v for k, v in json.loads(e).items() if k != "payload"} for e in raw or []]


#: ``dispatch(job_id, countdown)``: send a ``tasks.deliver_webhook`` task.
Dispatch = Callable[[str, float], None]


def dispatcher(celery: Any) -> Dispatch:
    """A :data:`Dispatch` through ``celery`` (the worker's app or the web tier's client)."""

    def dispatch(job_id: str, countdown: float = 0.0) -> None:
        celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE, countdown=countdown or None)

    return dispatch


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Deliverer:
    """Delivers one job's pending events, in order, while holding the job's delivery lock.

    ``dispatch`` schedules the next run (a retry's back-off); ``http`` is the client POSTs
    go through (redirects are not followed: the allow-list holds for the final URL)."""

    def __init__(self, r: redis.Redis, secret: str, backoff: float, retry_seconds: float, dispatch: Dispatch,
                 http: httpx.Client | None = None):  # fmt: skip
        from standardwebhooks import Webhook

        self.r = r
        self.signer = Webhook(secret)
        self.backoff = backoff
        self.retry_seconds = retry_seconds
        self.dispatch = dispatch
        self.http = http or httpx.Client(timeout=TIMEOUT, follow_redirects=False)

    def delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: backoff, 2·backoff, 4·backoff ... ≤ 1 h."""
        return min(MAX_BACKOFF, self.backoff * 2 ** (attempts - 1))

    def run(self, job_id: str) -> str:
        """``done`` (nothing pending), ``waiting`` (the next event's retry is not due yet),
        ``retrying`` (an attempt failed; a retry is scheduled), ``busy`` (another process
        delivers this job's events: it will see ours) or ``gone`` (the job was deleted)."""
        lock, me = Keys.webhook_lock(job_id), secrets.token_hex(8)
        while True:
            if not self.r.set(lock, me, nx=True, ex=LOCK_SECONDS):
                return "busy"
            try:
                outcome = self._deliver(job_id, lock)
            finally:
                self.r.eval(_RELEASE, 1, lock, me)
            # An event appended after our last look, whose own task found us busy, is ours.
            if outcome != "done" or not self._pending(job_id):
                return outcome

    def _pending(self, job_id: str) -> bool:
        return any(json.loads(e)["state"] == "pending" for e in read_log(self.r, job_id))

    def _deliver(self, job_id: str, lock: str) -> str:
        while True:
            raw_spec = self.r.hget(Keys.job(job_id), "webhook")
            if raw_spec is None:
                self.r.zrem(Keys.WEBHOOKS_DUE, job_id)
                return "gone"
            url = json.loads(raw_spec)["url"]
            entries = read_log(self.r, job_id)
            index, entry = next(((i, json.loads(e)) for i, e in enumerate(entries)
                                 if json.loads(e)["state"] == "pending"), (None, None))  # fmt: skip
            if entry is None:
                self.r.zrem(Keys.WEBHOOKS_DUE, job_id)
                return "done"
            now = time.time()
            if entry["next_at"] > now:
                self.r.zadd(Keys.WEBHOOKS_DUE, {job_id: entry["next_at"]})
                return "waiting"
            self.r.expire(lock, LOCK_SECONDS)
            attempt = self.post(url, entry)
            entry["attempts"].append(attempt)
            outcome = None
            if attempt["ok"]:
                entry["state"], entry["delivered_at"] = "delivered", attempt["at"]
            else:
                wait = self.delay(len(entry["attempts"]))
                if attempt["status"] == 410 or time.time() + wait - entry["created_at"] > self.retry_seconds:
                    entry["state"] = "failed"  # given up (410 Gone: the receiver asked us to stop)
                    log.warning("job %s: webhook %s given up after %d attempts (%s)", job_id, entry["event"],
                                len(entry["attempts"]), attempt["error"])  # fmt: skip
                else:
                    entry["next_at"] = time.time() + wait
                    outcome = "retrying"
            self.r.lset(Keys.webhook_log(job_id), index, json.dumps(entry, separators=(",", ":")))
            if outcome == "retrying":
                self.r.zadd(Keys.WEBHOOKS_DUE, {job_id: entry["next_at"]})
                self.dispatch(job_id, wait)
                return outcome

    def post(self, url: str, entry: dict[str, Any]) -> dict[str, Any]:
        """One signed POST; the attempt as the log keeps it."""
        body, msg_id = entry["payload"], entry["id"]
        sent = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": "framepack-celery-webhooks/1",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(sent.timestamp())),
            "webhook-signature": self.signer.sign(msg_id, sent, body),
        }
        started = time.monotonic()
        try:
            resp = self.http.post(url, content=body.encode(), headers=headers)
        except httpx.HTTPError as exc:
            status, error = None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            status = resp.status_code
            error = None if 200 <= status < 300 else f"HTTP {status}"
        return {"at": sent.timestamp(), "status": status, "ok": error is None,
                "seconds": round(time.monotonic() - started, 3), "error": error}  # fmt: skip


def overdue(r: redis.Redis, now: float) -> list[str]:
    """Jobs whose next delivery was due ``RECOVER_AFTER`` seconds ago (its task was lost)."""
    return [i.decode() for i in r.zrangebyscore(Keys.WEBHOOKS_DUE, 0, now - RECOVER_AFTER)]


# -- the Celery task (the ``webhooks`` queue's worker) --------------------------------------
_deliverers: dict[int, Deliverer] = {}


def _deliverer(app: Any) -> Deliverer:
    """One per process (a fork gets its own Redis and HTTP connections)."""
    pid = os.getpid()
    if pid not in _deliverers:
        from .settings import connect
        from .worker import state  # the worker process's settings (read once, at its start)

        s = state().settings
        _deliverers.clear()
        _deliverers[pid] = Deliverer(connect(s.store_url, s.redis_retry_seconds), s.webhook_secret,
                                     s.webhook_backoff, s.webhook_retry_seconds, dispatcher(app))  # fmt: skip
    return _deliverers[pid]


@shared_task(bind=True, name=TASK_NAME, ignore_result=True, acks_late=False, time_limit=600, soft_time_limit=540)
def deliver_webhook(self: Any, job_id: str) -> str:
    """Deliver the job's pending webhook events (see :class:`Deliverer`)."""
    return _deliverer(self.app).run(job_id)
