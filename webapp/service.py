"""The web tier's services: job store, hub, dispatch, and the job snapshot (no Flask).

Everything a route needs about a job goes through :class:`Service`, so the REST API, the
WebSocket, the SSE compatibility stream and the browser see the same snapshot.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from diffusers_helper.params import JobParams
from tasks import settings
from tasks.app import make_celery
from tasks.jobs import JobStore, new_job_id
from tasks.protocol import (
    LEGACY_STATUS,
    QUEUE,
    TASK_NAME,
    TERMINAL,
    JobState,
    Keys,
    exception_fields,
    make_meta,
)

from .hub import JobHub


def job_links(job_id: str) -> dict[str, str]:
    return {
        "self": f"/api/jobs/{job_id}",
        "ws": f"/ws/jobs/{job_id}",
        "video": f"/api/jobs/{job_id}/video",
        "input": f"/api/jobs/{job_id}/input",
        "cancel": f"/api/jobs/{job_id}/cancel",
        "page": f"/jobs/{job_id}",
    }


def decorate(job_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A worker meta as clients see it: section and video URLs instead of file names."""
    out = {k: v for k, v in meta.items() if not k.startswith("exc_")}
    if "sections_done" in out:
        out["sections_done"] = [
            {**{k: v for k, v in s.items() if k != "file"}, "url": f"/api/jobs/{job_id}/sections/{s['section']}"}
            for s in out["sections_done"]
        ]
    result = out.get("result")
    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if k != "video"}
        if meta.get("state") == JobState.SUCCEEDED.value:
            result["video_url"] = f"/api/jobs/{job_id}/video"
        out["result"] = result
    return out


class Service:
    def __init__(self, redis_url: str, results_dir: Path, celery: Celery | None = None, poll_interval: float = 2.0):
        self.redis = redis.Redis.from_url(redis_url, max_connections=1000)
        self.store = JobStore(self.redis, settings.RESULT_TTL)
        self.hub = JobHub(redis_url, decorate, poll_interval)
        self.celery = celery or make_celery(client=True)
        self.results_dir = results_dir
        self._janitor: threading.Thread | None = None

    # -- submit / cancel / delete -------------------------------------------------------
    def submit(self, params: JobParams, image_png: bytes, end_png: bytes | None) -> dict[str, Any]:
        params = params.with_seed()  # chosen here, so a redelivered job reproduces
        job_id = new_job_id()
        stored = params.model_dump(mode="json")
        stored["end_image"] = "upload" if end_png is not None else None
        self.store.create(job_id, stored, settings.profile_spec(), image_png, end_png)
        try:
            self.celery.send_task(TASK_NAME, args=[job_id, stored], task_id=job_id, queue=QUEUE)
        except Exception:
            self.store.discard(job_id)
            raise
        self.store.publish_event({"job_id": job_id, "state": "queued", "event": "submitted"})
        return self.view(job_id)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cooperative: the worker reads the flag at its next step.  A queued job is
        finished here and now (it will never start)."""
        self.store.request_cancel(job_id)
        rec = self.store.get(job_id)
        if rec and rec["state"] == JobState.QUEUED.value:
            self.store.mark_finished(job_id, JobState.CANCELLED, None, None)
            self._write_final(job_id, JobState.CANCELLED, None)
            self.store.publish_event({"job_id": job_id, "state": "cancelled", "event": "finished"})
        return self.view(job_id)

    def _write_final(self, job_id: str, state: JobState, error: str | None) -> None:
        """A final meta for a job no worker will finish (cancelled while queued, worker
        lost), written where the worker would have written it."""
        latest = self.store.latest_meta(job_id)
        rec = self.store.get(job_id) or {}
        seq = max(latest[1].get("seq", 0) if latest else 0, rec.get("seq", 0)) + 1
        extra = exception_fields("TaskRevokedError" if state is JobState.CANCELLED else "RuntimeError", error or "")
        meta = make_meta(seq, state, event="final", finished_at=time.time(), error=error, **extra)
        doc = json.dumps({"status": "REVOKED" if state is JobState.CANCELLED else "FAILURE", "result": meta,
                          "traceback": None, "children": [], "date_done": None, "task_id": job_id})  # fmt: skip
        p = self.redis.pipeline(transaction=True)
        p.set(Keys.celery_meta(job_id), doc, ex=settings.RESULT_TTL)
        p.publish(Keys.celery_meta(job_id), doc)
        p.hset(Keys.job(job_id), "seq", seq)
        p.execute()

    def delete(self, job_id: str) -> None:
        self.store.delete(job_id)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    # -- reading ------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.results_dir / job_id

    def view(self, job_id: str) -> dict[str, Any] | None:
        """The snapshot of a job: record + the worker's latest update + queue position."""
        rec = self.store.get(job_id)
        if rec is None:
            return None
        latest = self.store.latest_meta(job_id)
        meta = decorate(job_id, latest[1]) if latest else {}
        state = JobState(rec["state"])
        if latest and latest[0] in TERMINAL:
            state = latest[0]
        elif latest and state is JobState.QUEUED and latest[1].get("seq"):
            state = JobState.RUNNING
        stalled = False
        if state is JobState.RUNNING and not self.store.is_alive(job_id):
            last = max(rec.get("started_at") or 0, meta.get("emitted_at") or 0)
            stalled = time.time() - last > settings.HEARTBEAT_TTL
            if time.time() - last > settings.STALL_FAIL_SECONDS:
                self.store.request_cancel(job_id)  # a worker that wakes up again stops at its next step
                self.store.mark_finished(job_id, JobState.FAILED, None, "worker lost (no heartbeat)")
                self._write_final(job_id, JobState.FAILED, "worker lost (no heartbeat)")
                return self.view(job_id)
        view: dict[str, Any] = {
            "id": job_id,
            "state": state.value,
            "status": LEGACY_STATUS[state],
            "position": self.store.position(job_id) if state is JobState.QUEUED else None,
            "stalled": stalled,
            "seq": max(meta.get("seq", 0), rec["seq"]),
            "progress": 1.0 if state is JobState.SUCCEEDED else meta.get("progress", 0.0),
            "stage": meta.get("stage"),
            "message": meta.get("message"),
            "step": meta.get("step"),
            "steps": meta.get("steps"),
            "section": meta.get("section"),
            "sections": meta.get("sections"),
            "eta": meta.get("eta"),
            "preview": meta.get("preview"),
            "sections_done": meta.get("sections_done", []),
            "result": rec.get("result") and decorate(job_id, {"state": state.value, "result": rec["result"]})["result"],
            "error": rec.get("error") or meta.get("error"),
            "created_at": rec.get("created_at"),
            "started_at": rec.get("started_at"),
            "finished_at": rec.get("finished_at"),
            "updated_at": meta.get("emitted_at"),
            "attempts": rec.get("attempts", 0),
            "params": rec.get("params"),
            "profile": rec.get("profile"),
            "links": job_links(job_id),
        }
        return view

    def summary(self, job_id: str) -> dict[str, Any] | None:
        v = self.view(job_id)
        if v is None:
            return None
        keep = ("id", "state", "status", "position", "progress", "section", "sections", "stalled", "error",
                "created_at", "finished_at", "links")  # fmt: skip
        out = {k: v[k] for k in keep}
        out["prompt"] = (v.get("params") or {}).get("prompt", "")
        return out

    def workers(self) -> list[dict[str, Any]]:
        alive_since = time.time() - settings.HEARTBEAT_TTL
        names = [n.decode() for n in self.redis.zrangebyscore(Keys.WORKERS, alive_since, "+inf")]
        if not names:
            return []
        return [json.loads(raw) for raw in self.redis.mget([Keys.worker(n) for n in names]) if raw]

    def ready(self) -> tuple[bool, str]:
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as exc:  # noqa: BLE001
            return False, f"broker unreachable: {exc}"
        try:
            live = [w for w in self.workers() if w.get("ready") and QUEUE in w.get("queues", [])]
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        if not live:
            errors = sorted({w["error"] for w in self.workers() if w.get("error")})
            why = f": {'; '.join(errors)}" if errors else ""
            return False, f"no worker with its model loaded consumes queue '{QUEUE}'{why}"
        return True, f"{len(live)} worker(s) ready"

    def start_janitor(self, every: float = 600.0) -> None:
        """Expire finished jobs' index entries and files with ``result_expires``."""
        if self._janitor is not None:
            return

        def sweep() -> None:
            while True:
                try:
                    for job_id in self.store.prune_expired():
                        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
                except redis.RedisError:
                    pass
                time.sleep(every)

        self._janitor = threading.Thread(target=sweep, name="framepack-janitor", daemon=True)
        self._janitor.start()


__all__ = ["Service", "decorate", "job_links"]
