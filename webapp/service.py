"""The web tier's services: reads of jobs, dispatch, and the lifecycle calls (no Flask).

Everything a route needs about a job goes through :class:`Service`, so the REST API, the
WebSocket, the SSE compatibility stream and the browser see the same snapshot.  Reads that
list jobs take an ``owner``: a token's name reads that token's jobs only (its own indexes),
None reads every job; who may read what is decided by the caller (``webapp.auth``).  Reads
here never change a job; transitions go through :class:`tasks.lifecycle.Lifecycle`, and
the sweep (:mod:`tasks.sweeper`) runs in a background thread of one web process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import redis
from celery import Celery

from diffusers_helper.params import ExtendParams, JobParams
from tasks import webhooks
from tasks.celery_app import make_celery
from tasks.lifecycle import Lifecycle, QueueFull, decode_record, new_job_id
from tasks.metrics import ClusterCollector
from tasks.protocol import (
    CHECKPOINT_FILE,
    INPUT_FILE,
    QUEUE,
    TASK_NAME,
    TERMINAL,
    JobState,
    Keys,
    Reason,
    parse_celery_payload,
)
from tasks.results import ResultsStore, open_store
from tasks.settings import Settings, connect
from tasks.snapshot import build_batch, build_snapshot, decorate, summary_of
from tasks.sweeper import Broker, Sweeper

from .hub import JobHub
from .metrics import WebMetrics

log = logging.getLogger("framepack.web")

#: The Celery hostname of events the web tier sends (Flower lists it as a worker).
EVENTS_HOSTNAME = f"framepack-web@{socket.gethostname()}"


#: Redis connections one web process uses at most (requests and streams share them; a call
#: takes one for a millisecond or so, so a burst of callers waits briefly for a free one).
REDIS_POOL = 100


class Service:
    def __init__(self, settings: Settings, celery: Celery | None = None, poll_interval: float = 2.0):
        self.settings = settings
        self.redis = connect(settings.store_url, settings.redis_retry_seconds, pool_size=REDIS_POOL)
        self.metrics = WebMetrics()
        self.hub = JobHub(
            settings.store_url, decorate, poll_interval, metrics=self.metrics, capacity=settings.watcher_capacity
        )
        self.celery = celery or make_celery(settings, client=True)
        self.store: ResultsStore = open_store(settings)
        self.lifecycle = Lifecycle(self.redis, settings, self._announce, webhooks.dispatcher(self.celery))
        nodes = lambda: {w["node"] for w in self.workers() if w.get("node")}  # noqa: E731
        broker = Broker(self.celery, nodes)
        self.sweeper = Sweeper(self.lifecycle, broker, self.remove_files,
                               on_redis_error=self.metrics.redis_errors.labels("sweep").inc)  # fmt: skip
        quick = connect(settings.store_url, 0)  # a scrape during an outage answers at once (redis_up 0)
        self.metrics.cluster = ClusterCollector(quick, broker.depth, lambda: self.workers(quick))

    def _announce(self, job_id: str, event: str, fields: dict[str, Any]) -> None:
        """A Celery task event from the web tier (a job it ended), so Flower shows the end."""
        with self.celery.events.default_dispatcher(hostname=EVENTS_HOSTNAME) as dispatcher:
            dispatcher.send(event, uuid=job_id, **fields)

    # -- transitions --------------------------------------------------------------------
    def submit(self, params: JobParams, image_png: bytes, end_png: bytes | None, *, owner: str | None = None,
               webhook: dict[str, Any] | None = None, batch: str | None = None,
               extends: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Store and dispatch a job.  Raises :class:`tasks.lifecycle.QueueFull` (nothing
        stored) over a queue limit, or the broker's error (nothing left stored)."""
        params = params.with_seed()  # chosen here, so a redelivered job reproduces
        job_id = new_job_id()
        stored = params.model_dump(mode="json")
        stored["end_image"] = "upload" if end_png is not None else None
        view = self.lifecycle.submit(job_id, stored, self.settings.profile, image_png, end_png, batch, extends,
                                     owner=owner, webhook=webhook)  # fmt: skip
        try:
            # the message carries the job id only: the record is the one source of its parameters
            self.celery.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=QUEUE)
        except Exception:
            self.lifecycle.discard(job_id, owner)
            raise
        log.info("job %s queued at position %s", job_id, view.get("position"), extra={"job_id": job_id})
        return view

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cooperative: the worker reads the flag at its next step.  A queued job ends here
        and now (it will never start)."""
        self.lifecycle.request_cancel(job_id)
        rec = self.lifecycle.record(job_id)
        if rec and rec["state"] == JobState.QUEUED.value:
            self.lifecycle.finish(job_id, JobState.CANCELLED, reason=Reason.CANCELLED)
        return self.snapshot(job_id)

    def submit_batch(self, entries: list[tuple[int, JobParams, bytes, bytes | None, dict[str, Any] | None]],
                     errors: list[dict[str, Any]], *, owner: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Each valid entry ``(index, params, image, end, webhook)`` becomes a normal job of
        one batch; ``errors`` are the entries refused at submit (kept with the batch, so its
        page says what did not run).  An entry over a queue limit is refused the same way,
        unless it is the first, when nothing is stored and :class:`QueueFull` is raised."""
        batch_id = new_job_id()
        job_ids: list[str] = []
        errors = list(errors)
        for index, params, image, end, webhook in entries:
            try:
                job_ids.append(self.submit(params, image, end, owner=owner, webhook=webhook, batch=batch_id)["id"])
            except QueueFull as exc:
                if not job_ids:
                    raise
                errors.append({"index": index, "field": "queue", "message": str(exc)})
        self.lifecycle.record_batch(batch_id, job_ids, sorted(errors, key=lambda e: e["index"]), owner=owner)
        return self.batch_snapshot(batch_id)

    def batch_snapshot(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(Keys.batch(batch_id))
        if not raw:
            return None
        rec = {k.decode(): v.decode() for k, v in raw.items()}
        ids = [i.decode() for i in self.redis.lrange(Keys.batch_jobs(batch_id), 0, -1)]
        jobs = [s for s in (self.summary(i) for i in ids) if s is not None]
        return build_batch(batch_id, rec, jobs).model_dump(mode="json")

    def cancel_batch(self, batch_id: str) -> dict[str, Any] | None:
        ids = [i.decode() for i in self.redis.lrange(Keys.batch_jobs(batch_id), 0, -1)]
        for job_id in ids:
            view = self.snapshot(job_id)
            if view is not None and JobState(view["state"]) not in TERMINAL:
                self.cancel(job_id)
        return self.batch_snapshot(batch_id)

    def has_checkpoint(self, job_id: str) -> bool:
        """Whether the job's last section checkpoint is in the results store (what an
        extension continues from; ``diffusers_helper.checkpoint``)."""
        return self.store.stat(job_id, CHECKPOINT_FILE) is not None

    def extension_params(self, original: dict[str, Any], ext: ExtendParams) -> JobParams:
        """The parameters of a job that continues ``original`` (a finished job's snapshot)
        forward with F1: its parameters and seed, the new length and, if given, new prompts."""
        from diffusers_helper.prompts import parse

        params = {k: v for k, v in original["params"].items() if k not in ("end_image", "has_end_image")}
        params.update(model="framepack-f1", total_second_length=ext.seconds,
                      prompt=ext.prompt if ext.prompt is not None else parse(params.get("prompt", ""))[0],
                      prompts=[p.model_dump() for p in ext.prompts] if ext.prompts else None)  # fmt: skip
        if ext.prompt_blend_sections is not None:
            params["prompt_blend_sections"] = ext.prompt_blend_sections
        return JobParams.model_validate(params)

    def extend(self, job_id: str, params: JobParams, *, owner: str | None = None) -> dict[str, Any]:
        """Submit ``params`` (:meth:`extension_params`) as a job extending ``job_id``, from its
        input.  Raises FileNotFoundError when that input is no longer stored."""
        image = self.store.read_all(job_id, INPUT_FILE)
        if image is None:
            raise FileNotFoundError(f"{job_id}/{INPUT_FILE}")
        return self.submit(params, image, None, owner=owner, extends=job_id)

    def delete(self, job_id: str) -> None:
        """Files first: if the store cannot be reached the job stays, and a retry finishes it."""
        self.remove_files(job_id)
        self.lifecycle.delete(job_id)

    def remove_files(self, job_id: str) -> None:
        """The job's files in the results store (deleted or expired jobs)."""
        count = self.store.delete(job_id)
        log.info("job %s: %d result file(s) removed from %s", job_id, count, self.store.url, extra={"job_id": job_id})

    def start_sweeper(self) -> None:
        self.sweeper.start(owner=f"{socket.gethostname()}:{os.getpid()}")

    # -- reads --------------------------------------------------------------------------
    def record(self, job_id: str) -> dict[str, Any] | None:
        return self.lifecycle.record(job_id)

    def latest_update(self, job_id: str) -> tuple[JobState, dict[str, Any]] | None:
        raw = self.redis.get(Keys.celery_meta(job_id))
        return None if raw is None else parse_celery_payload(raw)

    def final_message(self, job_id: str, view: dict[str, Any]) -> dict[str, Any]:
        """The ``final`` message for a job already over when a watcher arrives: the worker's
        own last meta when it has one (result, reason), else the record's snapshot."""
        latest = self.latest_update(job_id)
        final = decorate(job_id, latest[1]) if latest and latest[0] in TERMINAL else {**view, "seq": view["seq"]}
        return {"type": "final", "job_id": job_id, **final}

    def snapshot(self, job_id: str) -> dict[str, Any] | None:
        """The snapshot of a job (:class:`tasks.snapshot.JobSnapshot`); None if unknown."""
        p = self.redis.pipeline(transaction=False)
        p.hgetall(Keys.job(job_id))
        p.get(Keys.celery_meta(job_id))
        p.zrank(Keys.QUEUED, job_id)
        p.exists(Keys.heartbeat(job_id))
        webhooks.read_log(p, job_id)
        raw, meta, rank, alive, log = p.execute()
        rec = decode_record(raw)
        if rec is None:
            return None
        latest = parse_celery_payload(meta) if meta is not None else None
        view = build_snapshot(rec, latest, position=None if rank is None else rank + 1, alive=bool(alive),
                          heartbeat_ttl=self.settings.heartbeat_ttl, deliveries=webhooks.deliveries(log))  # fmt: skip
        return view.wire()

    def summary(self, job_id: str) -> dict[str, Any] | None:
        v = self.snapshot(job_id)
        return None if v is None else summary_of(v)

    def list_page(self, offset: int, limit: int, owner: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """A page of summaries, newest first: every job, or ``owner``'s."""
        index = Keys.JOBS if owner is None else Keys.owner_jobs(owner)
        ids = [i.decode() for i in self.redis.zrevrange(index, offset, offset + limit - 1)]
        total = int(self.redis.zcard(index))
        return [s for s in (self.summary(i) for i in ids) if s is not None], total

    def queued(self, owner: str | None = None) -> list[tuple[str, int]]:
        """(job id, 1-based position in the whole queue) of every queued job, or ``owner``'s."""
        if owner is None:
            return [(i.decode(), n) for n, i in enumerate(self.redis.zrange(Keys.QUEUED, 0, -1), start=1)]
        ids = [i.decode() for i in self.redis.zrange(Keys.owner_queued(owner), 0, -1)]
        p = self.redis.pipeline(transaction=False)
        for job_id in ids:
            p.zrank(Keys.QUEUED, job_id)
        return [(i, rank + 1) for i, rank in zip(ids, p.execute(), strict=True) if rank is not None]

    def running_ids(self, owner: str | None = None) -> list[str]:
        ids = [i.decode() for i in self.redis.zrange(Keys.RUNNING, 0, -1)]
        if owner is None or not ids:
            return ids
        p = self.redis.pipeline(transaction=False)
        for job_id in ids:
            p.hget(Keys.job(job_id), "owner")
        return [i for i, o in zip(ids, p.execute(), strict=True) if o is not None and o.decode() == owner]

    def succeeded_ids(self, owner: str | None = None) -> list[str]:
        """Jobs that ended with a video, newest first (bounded by the results' lifetime): every
        job's, or ``owner``'s."""
        ids, _ = self.list_page(0, 1000, owner)
        return [j["id"] for j in ids if j["state"] == JobState.SUCCEEDED.value]

    def cleanup_finished(self, keep: int, owner: str | None = None) -> int:
        """Delete the finished jobs (and their files) beyond the newest ``keep``: of every
        job, or of ``owner``'s."""
        finished = [j["id"] for j in self.list_page(0, 10_000, owner)[0] if JobState(j["state"]) in TERMINAL]
        for job_id in finished[keep:]:
            self.delete(job_id)
        return max(0, len(finished) - keep)

    def read_input(self, job_id: str) -> bytes | None:
        return self.redis.get(Keys.input(job_id))

    def workers(self, client: redis.Redis | None = None) -> list[dict[str, Any]]:
        r = client or self.redis
        alive_since = time.time() - self.settings.heartbeat_ttl
        names = [n.decode() for n in r.zrangebyscore(Keys.WORKERS, alive_since, "+inf")]
        if not names:
            return []
        return [json.loads(raw) for raw in r.mget([Keys.worker(n) for n in names]) if raw]

    def ready(self) -> tuple[bool, str]:
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as exc:  # noqa: BLE001
            return False, f"broker unreachable: {exc}"
        try:
            workers = self.workers()
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        live = [w for w in workers if w.get("ready") and QUEUE in w.get("queues", [])]
        if not live:
            warming = [w for w in workers if w.get("warming") and QUEUE in w.get("queues", [])]
            if warming:
                speed = warming[0].get("speed") or {}
                opts = ", ".join(f"{k}={v}" for k, v in speed.items() if k != "warm_up_seconds")
                return False, f"{len(warming)} worker(s) warming up (compiling the model: {opts})"
            errors = sorted({w["error"] for w in workers if w.get("error")})
            why = f": {'; '.join(errors)}" if errors else ""
            return False, f"no worker with its model loaded consumes queue '{QUEUE}'{why}"
        return True, f"{len(live)} worker(s) ready"


__all__ = ["TERMINAL", "Service"]
