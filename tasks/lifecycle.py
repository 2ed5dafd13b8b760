"""Every transition of a job, and the only writer of a job's end (torch- and Flask-free).

    queued ──start──▶ running ──finish──▶ succeeded | failed | cancelled
      │                 │  ▲
      │                 └──┘ redelivered (its worker died): start again, attempts + 1
      └──────finish──────────▶ cancelled | failed   (cancel while queued, revoke, purge)

The web tier (submit, cancel, delete), the worker (start, finish) and the background
sweep (stalled, revoked, purged jobs) all go through :class:`Lifecycle`.  :meth:`finish`
writes, in one Redis transaction, the job record, Celery's result document (which is also
published to the job's watchers) and the all-jobs feed event, then announces the end to
Flower as a Celery task event.  It writes once: a job that already ended keeps its first
verdict, whoever tries to end it again.

Progress updates are not transitions: the worker writes them with Celery's
``update_state`` (:class:`tasks.worker.Reporter`).

A job may belong to an API token (``owner``): :meth:`submit` keeps per-owner indexes (its
jobs, its queued jobs) and refuses, in the same transaction that stores the job, one over
``max_queued_per_token`` or ``max_queue`` (:class:`QueueFull`), so two submits at once
cannot both pass.  The transitions log the job's webhook events (:mod:`tasks.webhooks`):
``start`` in :meth:`start`'s transaction, ``completed`` in :meth:`finish`'s, then send
the delivery task (``dispatch``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from . import webhooks
from .protocol import (
    TERMINAL,
    JobState,
    Keys,
    Reason,
    celery_document,
    feed_event,
    flower_event,
    latest_seq,
    make_meta,
)
from .settings import Settings
from .snapshot import build_snapshot, summary_of

log = logging.getLogger("framepack.lifecycle")

#: ``announce(job_id, event_type, fields)``: sends a Celery task event (Flower).
Announce = Callable[[str, str, dict[str, Any]], None]

#: Fields of the latest update that a final carries on (what clients keep showing).
STICKY = ("started_at", "sections_done", "progress", "stage", "message", "step", "steps", "section", "sections",
          "eta", "preview")  # fmt: skip


def _s(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def decode_record(raw: dict[Any, Any]) -> dict[str, Any] | None:
    """A ``fp:job:<id>`` hash as Python values."""
    if not raw:
        return None
    rec = {_s(k): _s(v) for k, v in raw.items()}
    for key in ("params", "result", "webhook"):
        if rec.get(key):
            rec[key] = json.loads(rec[key])
    for key in ("created_at", "started_at", "finished_at"):
        if rec.get(key):
            rec[key] = float(rec[key])
    rec["attempts"] = int(rec.get("attempts") or 0)
    rec["seq"] = int(rec.get("seq") or 0)
    return rec


def new_job_id() -> str:
    """Unguessable (128 random bits), URL-safe; also the Celery task id.  Never begins with
    ``-``: operators pass it to command lines (``celery control revoke <id>``,
    ``framepack-client watch <id>``), which would read it as an option."""
    while (job_id := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return job_id


def worker_name() -> str:
    """host:pid of the process that runs jobs (the pool child under prefork)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str | None) -> bool:
    """True when ``holder`` (host:pid) is a process of this host that no longer exists."""
    if not holder or ":" not in holder:
        return False
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class QueueFull(Exception):
    """A submit refused before anything was stored: ``scope`` ``token`` (the owner has
    ``limit`` queued jobs already) or ``queue`` (``limit`` jobs are queued in all)."""

    def __init__(self, scope: str, limit: int):
        self.scope, self.limit = scope, limit
        who = "this token has" if scope == "token" else "the service has"
        super().__init__(f"queue: {who} {limit} queued jobs already (the limit); retry when one has started")


@dataclass(frozen=True)
class Start:
    """What :meth:`Lifecycle.start` decided for a delivered task."""

    verdict: str  # run | gone | ended | duplicate
    record: dict[str, Any] | None = None
    attempts: int = 0

    @property
    def runs(self) -> bool:
        return self.verdict == "run"


class Lifecycle:
    def __init__(self, client: redis.Redis, settings: Settings, announce: Announce | None = None,
                 dispatch: webhooks.Dispatch | None = None):  # fmt: skip
        self.r = client
        self.settings = settings
        self.announce = announce
        self.dispatch = dispatch  # sends a webhook delivery task (None: the sweep sends it later)

    @property
    def ttl(self) -> int:
        return self.settings.result_ttl

    # -- reads the transitions need --------------------------------------------------------
    def record(self, job_id: str) -> dict[str, Any] | None:
        return decode_record(self.r.hgetall(Keys.job(job_id)))

    # -- queued ----------------------------------------------------------------------------
    def submit(self, job_id: str, params: dict[str, Any], profile: str, image_png: bytes, end_png: bytes | None,
               batch: str | None = None, extends: str | None = None, *, owner: str | None = None,
               webhook: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """Record a queued job and its input, all or nothing (before it is dispatched).

        Raises :class:`QueueFull` (nothing stored) when ``owner`` already has
        ``max_queued_per_token`` queued jobs or ``max_queue`` jobs are queued in all; the
        counts are read under WATCH, so concurrent submits cannot both take the last place."""
        now = time.time()
        number = self.r.incr(Keys.SUBMITTED)
        record = {"id": job_id, "state": JobState.QUEUED.value, "params": json.dumps(params), "profile": profile,
                  "created_at": repr(now), "attempts": "0", "seq": "0"}  # fmt: skip
        if batch is not None:
            record["batch"] = batch
        if extends is not None:
            record["extends"] = extends
        if owner is not None:
            record["owner"] = owner
        if webhook is not None:
            record["webhook"] = json.dumps(webhook)
        per_owner = self.settings.max_queued_per_token if owner is not None else 0
        total = self.settings.max_queue

        def txn(p: redis.client.Pipeline) -> None:
            self._check_room(p, owner)
            p.multi()
            p.hset(Keys.job(job_id), mapping=record)
            p.expire(Keys.job(job_id), self.ttl)
            p.set(Keys.input(job_id), image_png, ex=self.ttl)
            if end_png is not None:
                p.set(Keys.end_image(job_id), end_png, ex=self.ttl)
            p.zadd(Keys.JOBS, {job_id: now})
            if owner is not None:
                p.sadd(Keys.OWNERS, owner)
                p.zadd(Keys.owner_jobs(owner), {job_id: now})
                p.zadd(Keys.owner_queued(owner), {job_id: number})
            p.zadd(Keys.QUEUED, {job_id: number})
            p.hincrby(Keys.STATS, Keys.STATS_SUBMITTED, 1)
            p.zrank(Keys.QUEUED, job_id)

        watched = ([Keys.QUEUED] if total else []) + ([Keys.owner_queued(owner)] if per_owner else [])
        try:
            rank = self.r.transaction(txn, *watched)[-1]
        except QueueFull as exc:
            self.count_refusal(exc.scope)
            raise
        rec = decode_record(record) or {}
        view = build_snapshot(rec, None, position=(rank or 0) + 1, alive=False,
                              heartbeat_ttl=self.settings.heartbeat_ttl)
        self.r.publish(Keys.EVENTS, feed_event("submitted", job_id, JobState.QUEUED, summary=summary_of(view),
                                               owner=owner))  # fmt: skip
        return view.wire()

    def _check_room(self, r: redis.Redis | redis.client.Pipeline, owner: str | None) -> None:
        """:class:`QueueFull` when everyone's queue (``max_queue``) or the owner's
        (``max_queued_per_token``) has no room."""
        total = self.settings.max_queue
        per_owner = self.settings.max_queued_per_token if owner is not None else 0
        if total and r.zcard(Keys.QUEUED) >= total:
            raise QueueFull("queue", total)
        if per_owner and r.zcard(Keys.owner_queued(owner)) >= per_owner:
            raise QueueFull("token", per_owner)

    def check_room(self, owner: str | None) -> None:
        """Refuse (and count) a submission that would find no room, before its upload is
        read and decoded; :meth:`submit` checks again, atomically."""
        try:
            self._check_room(self.r, owner)
        except QueueFull as exc:
            self.count_refusal(exc.scope)
            raise

    def count_refusal(self, reason: str) -> None:
        """One more submission refused for ``reason`` (``tasks.protocol.REFUSALS``)."""
        self.r.hincrby(Keys.STATS, Keys.stats_refused(reason), 1)

    def record_batch(self, batch_id: str, job_ids: list[str], errors: list[dict[str, Any]],
                     owner: str | None = None) -> None:  # fmt: skip
        """A batch: its jobs (each already submitted), the entries refused at submit and
        whose it is (the token's name; "" when anonymous)."""
        p = self.r.pipeline(transaction=True)
        p.hset(Keys.batch(batch_id), mapping={"id": batch_id, "created_at": repr(time.time()), "owner": owner or "",
                                              "count": len(job_ids), "errors": json.dumps(errors)})  # fmt: skip
        if job_ids:
            p.rpush(Keys.batch_jobs(batch_id), *job_ids)
        p.expire(Keys.batch(batch_id), self.ttl)
        p.expire(Keys.batch_jobs(batch_id), self.ttl)
        p.execute()

    def discard(self, job_id: str, owner: str | None = None) -> None:
        """Undo :meth:`submit` (dispatch failed): nothing half-written stays."""
        p = self.r.pipeline(transaction=True)
        p.delete(Keys.job(job_id), Keys.input(job_id), Keys.end_image(job_id))
        p.zrem(Keys.JOBS, job_id)
        p.zrem(Keys.QUEUED, job_id)
        if owner is not None:
            p.zrem(Keys.owner_jobs(owner), job_id)
            p.zrem(Keys.owner_queued(owner), job_id)
        p.execute()
        self.r.publish(Keys.EVENTS, feed_event("deleted", job_id, None, owner=owner))

    def request_cancel(self, job_id: str) -> None:
        """Cooperative cancel: a running worker stops at its next step; a queued job is
        ended at once by the caller (:meth:`finish`)."""
        self.r.set(Keys.cancel(job_id), "1", ex=self.ttl)

    # -- running ---------------------------------------------------------------------------
    def start(self, job_id: str, worker: str) -> Start:
        """A worker received the job's task.  Decides whether it runs:

        - ``gone``: deleted or expired while queued;
        - ``ended``: it already ended (cancelled while queued, revoked, purged, failed...);
        - ``duplicate``: another live worker runs it (a message restored after a broker
          restart): this delivery is dropped, the live run goes on;
        - ``run``: running now; ``attempts`` counts deliveries (2 = redelivered once, after
          its worker died), and past ``1 + max_redeliveries`` the job fails instead.

        The ends decided here are not announced to Flower: the caller, which holds the
        delivered task, does that.
        """
        key, beat = Keys.job(job_id), Keys.heartbeat(job_id)
        cancelled = bool(self.r.exists(Keys.cancel(job_id)))

        def txn(pipe: redis.client.Pipeline) -> Start:
            rec = decode_record(pipe.hgetall(key))
            if rec is None:
                return Start("gone")
            state = JobState(rec["state"])
            if state in TERMINAL or cancelled:
                return Start("ended", rec)
            holder = _s(pipe.get(beat))
            if state is JobState.RUNNING and holder and holder != worker and not holder_is_dead(holder):
                return Start("duplicate", rec)
            attempts = rec["attempts"] + 1
            now = repr(time.time())
            pipe.multi()
            started = repr(rec["started_at"]) if rec.get("started_at") else now  # a redelivery keeps the first
            running = {"state": JobState.RUNNING.value, "worker": worker, "attempts": attempts, "started_at": started}
            pipe.hset(key, mapping=running)
            pipe.zrem(Keys.QUEUED, job_id)
            if rec.get("owner"):
                pipe.zrem(Keys.owner_queued(rec["owner"]), job_id)
            pipe.zadd(Keys.RUNNING, {job_id: float(now)})
            pipe.set(beat, worker, ex=self.settings.heartbeat_ttl)
            if attempts == 1 and webhooks.wants(rec, "start"):  # once: a redelivery is no new start
                view = build_snapshot({**rec, **running, "started_at": float(started)}, None, position=None, alive=True,
                                  heartbeat_ttl=self.settings.heartbeat_ttl)  # fmt: skip
                webhooks.log_event(pipe, job_id, "start", webhooks.payload("start", view.wire()), rec["seq"], self.ttl)
            return Start("run", rec, attempts)

        position = self.r.zrank(Keys.QUEUED, job_id)
        decision: Start = self.r.transaction(txn, key, beat, value_from_callable=True)
        if decision.verdict == "ended" and cancelled and decision.record["state"] not in {s.value for s in TERMINAL}:
            self.finish(job_id, JobState.CANCELLED, reason=Reason.CANCELLED, announce=False)
            decision = Start("ended", self.record(job_id))
        elif decision.runs:
            if decision.attempts > 1 + self.settings.max_redeliveries:
                error = Reason.REDELIVERED.format(attempts=decision.attempts)
                self.finish(job_id, JobState.FAILED, error=error, announce=False)
                return Start("ended", self.record(job_id), decision.attempts)
            self.r.publish(Keys.EVENTS, feed_event("started", job_id, JobState.RUNNING, seq=decision.record["seq"],
                                                   left_position=None if position is None else position + 1,
                                                   attempts=decision.attempts,
                                                   owner=decision.record.get("owner")))  # fmt: skip
            if decision.attempts == 1 and webhooks.wants(decision.record, "start"):
                self.deliver_webhooks(job_id)
        return decision

    def webhook_event(self, job_id: str, event: str, meta: dict[str, Any]) -> None:
        """Log a running job's webhook ``event`` (``section``: the worker wrote that update,
        ``meta``) with the snapshot of that moment, and send the delivery task."""
        rec = self.record(job_id)
        if rec is None or not webhooks.wants(rec, event):
            return
        view = build_snapshot(rec, (JobState.RUNNING, meta), position=None, alive=True,
                          heartbeat_ttl=self.settings.heartbeat_ttl)  # fmt: skip
        p = self.r.pipeline(transaction=True)
        webhooks.log_event(p, job_id, event, webhooks.payload(event, view.wire()), meta.get("seq", 0), self.ttl)
        p.execute()
        self.deliver_webhooks(job_id)

    def deliver_webhooks(self, job_id: str) -> None:
        """Send the job's webhook delivery task; a broker that refuses is no reason to fail a
        transition (the sweep sends it again once the delivery is overdue)."""
        if self.dispatch is None:
            return
        try:
            self.dispatch(job_id, 0.0)
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: could not send its webhook delivery task (the sweep retries): %s", job_id, exc)

    def save_seq(self, job_id: str, seq: int) -> None:
        """The last update's ``seq``, kept in the record: a redelivered run continues from it
        (Celery's result key may hold a document of Celery's own by then)."""
        self.r.hset(Keys.job(job_id), "seq", seq)

    # -- the end ---------------------------------------------------------------------------
    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        error: str | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
        announce: bool = True,
    ) -> dict[str, Any] | None:
        """End the job, once: record, Celery's result document (published to watchers),
        feed event, then the Celery task event for Flower (unless ``announce`` is False:
        Celery announced it itself).  Returns the final meta, or None when the job had
        already ended or no longer exists (nothing is written then).

        ``fields`` are the worker's sticky fields (progress, sections); without them the
        final carries those of the latest update, so clients keep the sections they saw.
        ``reason`` defaults to ``error`` for failed jobs."""
        assert state in TERMINAL
        if state is JobState.FAILED:
            reason = reason or error
        key, meta_key = Keys.job(job_id), Keys.celery_meta(job_id)

        def txn(pipe: redis.client.Pipeline) -> dict[str, Any] | None:
            rec = decode_record(pipe.hgetall(key))
            if rec is None or JobState(rec["state"]) in TERMINAL:
                return None
            raw = pipe.get(meta_key)
            last = json.loads(raw).get("result") if raw else None
            last = last if isinstance(last, dict) else {}
            seq = latest_seq(rec, last) + 1
            sticky = fields if fields is not None else {k: last[k] for k in STICKY if k in last}
            now = time.time()
            extra: dict[str, Any] = {"finished_at": now, "attempts": rec["attempts"]}
            if state is JobState.SUCCEEDED:
                sticky = {**sticky, "progress": 1.0}
            for name, value in (("result", result), ("error", error), ("reason", reason)):
                if value is not None:
                    extra[name] = value
            meta = make_meta(seq, state, event="final", **{**sticky, **extra})
            doc = celery_document(job_id, state, meta)
            record = {"state": state.value, "finished_at": repr(now), "seq": seq}
            if result is not None:
                record["result"] = json.dumps(result)
            if error is not None:
                record["error"] = error
            if reason is not None:
                record["reason"] = reason
            position = pipe.zrank(Keys.QUEUED, job_id)
            view = build_snapshot({**rec, **record, "finished_at": now, "result": result}, (state, meta), position=None,
                              alive=False, heartbeat_ttl=self.settings.heartbeat_ttl)  # fmt: skip
            pipe.multi()
            pipe.hset(key, mapping=record)
            pipe.zrem(Keys.QUEUED, job_id)
            pipe.zrem(Keys.RUNNING, job_id)
            if rec.get("owner"):
                pipe.zrem(Keys.owner_queued(rec["owner"]), job_id)
            pipe.hdel(Keys.MISSING, job_id)
            if JobState(rec["state"]) is JobState.QUEUED:  # never ran: its input is nowhere else, keep it
                pipe.delete(Keys.heartbeat(job_id))
            else:  # the worker keeps it with the job's files
                pipe.delete(Keys.heartbeat(job_id), Keys.input(job_id), Keys.end_image(job_id))
            pipe.set(meta_key, doc, ex=self.ttl)
            pipe.publish(meta_key, doc)
            pipe.hincrby(Keys.STATS, Keys.stats_finished(state.value), 1)
            pipe.publish(Keys.EVENTS, feed_event("finished", job_id, state, seq=seq, summary=summary_of(view),
                                                 left_position=None if position is None else position + 1,
                                                 owner=rec.get("owner")))  # fmt: skip
            if webhooks.wants(rec, "completed"):  # in this transaction: logged exactly once
                webhooks.log_event(pipe, job_id, "completed", webhooks.payload("completed", view.wire()), seq, self.ttl)
                notify.append(job_id)
            return meta

        notify: list[str] = []
        meta = self.r.transaction(txn, key, meta_key, value_from_callable=True)
        if meta is not None and notify:
            self.deliver_webhooks(job_id)
        if meta is not None and announce and self.announce is not None:
            event, event_fields = flower_event(state, meta)
            try:
                self.announce(job_id, event, event_fields)
            except Exception as exc:  # noqa: BLE001 — Flower's view is not worth failing a job over
                log.warning("could not announce %s of job %s to Flower: %s", event, job_id, exc,
                            extra={"job_id": job_id})  # fmt: skip
        return meta

    def finish_patiently(self, job_id: str, state: JobState, **kwargs: Any) -> dict[str, Any] | None:
        """:meth:`finish` through a Redis outage: retried (the client itself retries for
        ``redis_retry_seconds`` per call) for up to ``final_retry_seconds`` in all."""
        deadline = time.monotonic() + self.settings.final_retry_seconds
        while True:
            try:
                return self.finish(job_id, state, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    log.error("job %s: could not write its end (%s) within %.0f s: %s", job_id, state.value,
                              self.settings.final_retry_seconds, exc, extra={"job_id": job_id})  # fmt: skip
                    raise
                log.warning("job %s: Redis unavailable, retrying its end (%s): %s", job_id, state.value, exc,
                            extra={"job_id": job_id})  # fmt: skip
                time.sleep(1.0)

    def delete(self, job_id: str) -> None:
        """Forget a finished job, its webhook log included (the caller removes its files)."""
        owner = _s(self.r.hget(Keys.job(job_id), "owner"))
        p = self.r.pipeline(transaction=True)
        p.delete(Keys.job(job_id), Keys.input(job_id), Keys.end_image(job_id), Keys.cancel(job_id),
                 Keys.celery_meta(job_id), Keys.heartbeat(job_id), Keys.webhook_log(job_id))  # fmt: skip
        for index in (Keys.JOBS, Keys.QUEUED, Keys.RUNNING, Keys.WEBHOOKS_DUE):
            p.zrem(index, job_id)
        if owner:
            p.zrem(Keys.owner_jobs(owner), job_id)
            p.zrem(Keys.owner_queued(owner), job_id)
        p.hdel(Keys.MISSING, job_id)
        p.publish(Keys.EVENTS, feed_event("deleted", job_id, None, owner=owner))
        p.execute()
