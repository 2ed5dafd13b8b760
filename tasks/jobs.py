"""The job records in Redis, shared by the web tier and the worker (no Flask, no torch).

The web tier records a job *before* dispatching it, so unknown ids are 404, queued jobs
can be listed and positioned whatever the broker (Redis or RabbitMQ), and the worker
receives the normalised input through Redis rather than a shared disk.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis

from . import settings
from .protocol import TERMINAL, JobState, Keys, parse_celery_payload


def new_job_id() -> str:
    """Unguessable (128 random bits), URL-safe."""
    return secrets.token_urlsafe(16)


def _s(v: Any) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class JobStore:
    def __init__(self, client: redis.Redis, ttl_seconds: int):
        self.r = client
        self.ttl = ttl_seconds

    # -- web tier -----------------------------------------------------------------------
    def create(
        self, job_id: str, params: dict[str, Any], profile: str, image_png: bytes, end_png: bytes | None
    ) -> None:
        """Record a queued job and its input atomically (all or nothing)."""
        now = time.time()
        number = self.r.incr(Keys.SUBMITTED)
        record = {
            "id": job_id,
            "state": JobState.QUEUED.value,
            "params": json.dumps(params),
            "profile": profile,
            "created_at": repr(now),
            "attempts": "0",
        }
        p = self.r.pipeline(transaction=True)
        p.hset(Keys.job(job_id), mapping=record)
        p.expire(Keys.job(job_id), self.ttl)
        p.set(Keys.input(job_id), image_png, ex=self.ttl)
        if end_png is not None:
            p.set(Keys.end_image(job_id), end_png, ex=self.ttl)
        p.zadd(Keys.JOBS, {job_id: now})
        p.zadd(Keys.QUEUED, {job_id: number})
        p.execute()

    def discard(self, job_id: str) -> None:
        """Undo :meth:`create` (dispatch failed): nothing half-written stays."""
        p = self.r.pipeline(transaction=True)
        p.delete(Keys.job(job_id), Keys.input(job_id), Keys.end_image(job_id))
        p.zrem(Keys.JOBS, job_id)
        p.zrem(Keys.QUEUED, job_id)
        p.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(Keys.job(job_id))
        if not raw:
            return None
        rec = {_s(k): _s(v) for k, v in raw.items()}
        for key in ("params", "result"):
            if rec.get(key):
                rec[key] = json.loads(rec[key])
        for key in ("created_at", "started_at", "finished_at"):
            if rec.get(key):
                rec[key] = float(rec[key])
        rec["attempts"] = int(rec.get("attempts") or 0)
        rec["seq"] = int(rec.get("seq") or 0)
        return rec

    def position(self, job_id: str) -> int | None:
        """1-based FIFO position among queued jobs, or None when not queued."""
        rank = self.r.zrank(Keys.QUEUED, job_id)
        return None if rank is None else rank + 1

    def list_ids(self, offset: int, limit: int) -> tuple[list[str], int]:
        ids = [_s(i) for i in self.r.zrevrange(Keys.JOBS, offset, offset + limit - 1)]
        return ids, int(self.r.zcard(Keys.JOBS))

    def queued_ids(self) -> list[str]:
        return [_s(i) for i in self.r.zrange(Keys.QUEUED, 0, -1)]

    def request_cancel(self, job_id: str) -> None:
        self.r.set(Keys.cancel(job_id), "1", ex=self.ttl)

    def latest_meta(self, job_id: str) -> tuple[JobState, dict[str, Any]] | None:
        raw = self.r.get(Keys.celery_meta(job_id))
        return None if raw is None else parse_celery_payload(raw)

    def is_alive(self, job_id: str) -> bool:
        return bool(self.r.exists(Keys.heartbeat(job_id)))

    def delete(self, job_id: str) -> None:
        p = self.r.pipeline(transaction=True)
        p.delete(
            Keys.job(job_id), Keys.input(job_id), Keys.end_image(job_id), Keys.cancel(job_id),
            Keys.celery_meta(job_id), Keys.heartbeat(job_id),
        )  # fmt: skip
        p.zrem(Keys.JOBS, job_id)
        p.zrem(Keys.QUEUED, job_id)
        p.execute()

    def prune_expired(self) -> list[str]:
        """Drop index entries whose record expired (``result_expires``); returns their ids."""
        cutoff = time.time() - self.ttl
        old = [_s(i) for i in self.r.zrangebyscore(Keys.JOBS, 0, cutoff)]
        gone = [i for i in old if not self.r.exists(Keys.job(i))]
        if gone:
            self.r.zrem(Keys.JOBS, *gone)
            self.r.zrem(Keys.QUEUED, *gone)
        return gone

    # -- worker ---------------------------------------------------------------------------
    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(Keys.cancel(job_id)))

    def read_input(self, job_id: str) -> tuple[bytes | None, bytes | None]:
        return self.r.get(Keys.input(job_id)), self.r.get(Keys.end_image(job_id))

    def set_seq(self, job_id: str, seq: int) -> None:
        """The last update's ``seq``, kept outside Celery's meta key: Celery overwrites that
        with a bare STARTED when a job is redelivered, and the new run must go on from here."""
        self.r.hset(Keys.job(job_id), "seq", seq)

    def mark_started(self, job_id: str, worker: str) -> int:
        """Running on ``worker``; returns the delivery count (2 = redelivered once)."""
        p = self.r.pipeline(transaction=True)
        p.hincrby(Keys.job(job_id), "attempts", 1)
        p.hset(Keys.job(job_id), mapping={"state": JobState.RUNNING.value, "started_at": repr(time.time()),
                                          "worker": worker})  # fmt: skip
        p.zrem(Keys.QUEUED, job_id)
        p.set(Keys.heartbeat(job_id), worker, ex=settings.HEARTBEAT_TTL)
        attempts = p.execute()[0]
        return int(attempts)

    def mark_finished(self, job_id: str, state: JobState, result: dict | None, error: str | None) -> None:
        assert state in TERMINAL
        fields = {"state": state.value, "finished_at": repr(time.time())}
        if result is not None:
            fields["result"] = json.dumps(result)
        if error is not None:
            fields["error"] = error
        p = self.r.pipeline(transaction=True)
        p.hset(Keys.job(job_id), mapping=fields)
        p.zrem(Keys.QUEUED, job_id)
        p.delete(Keys.heartbeat(job_id), Keys.input(job_id), Keys.end_image(job_id))
        p.execute()

    def publish_event(self, payload: dict[str, Any]) -> None:
        """A state change for the all-jobs feed (``/ws/jobs``)."""
        self.r.publish(Keys.EVENTS, json.dumps({"type": "job", **payload}, separators=(",", ":")))
