"""The ``tasks.generate_video`` task and the worker's life (models, heartbeat).

The worker process loads its profile once (after the fork: CUDA cannot cross a fork),
announces in Redis which profile and variants it serves, and keeps a heartbeat for itself
and for the job it runs.  The task turns generation events into ``update_state`` calls
following :mod:`tasks.protocol`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init, worker_ready

from . import settings
from .jobs import JobStore
from .protocol import (
    INPUT_FILE,
    QUEUE,
    STATE_TO_CELERY,
    TASK_NAME,
    TERMINAL,
    JobState,
    Keys,
    exception_fields,
    make_meta,
    preview_field,
)

log = logging.getLogger("framepack.worker")

_lock = threading.Lock()
_state: dict[str, Any] = {"models": None, "current_job": None, "heartbeat": None}


def worker_name() -> str:
    """host:pid of the process that runs jobs (the pool child under prefork)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _redis() -> redis.Redis:
    if "redis" not in _state:
        _state["redis"] = redis.Redis.from_url(settings.store_url())
    return _state["redis"]


def store() -> JobStore:
    return JobStore(_redis(), settings.RESULT_TTL)


# -- worker life ------------------------------------------------------------------------
def load_models() -> Any:
    """Load the profile once per process; later calls return the same models."""
    with _lock:
        if _state["models"] is not None:
            return _state["models"]
        import torch

        from diffusers_helper.params import Variant
        from diffusers_helper.profiles import Models, resolve_profile

        threads = int(os.environ.get("FRAMEPACK_TORCH_THREADS", "0") or 0)
        if threads:
            torch.set_num_threads(threads)
        profile = resolve_profile(settings.profile_spec())
        log.warning("framepack worker: profile %s — %s", profile.name, profile.description)
        models = Models(profile)
        models.load_shared()
        models.transformer(Variant.FRAMEPACK)
        _state["models"] = models
    _start_heartbeat()
    return models


def _worker_record() -> dict[str, Any]:
    models = _state["models"]
    return {
        "name": worker_name(),
        "queues": [QUEUE],
        "ready": models is not None,
        "profile": models.profile.public_dict() if models else None,
        "device": models.placement.device if models else None,
        "loaded_variants": models.loaded_variants if models else [],
        "job": _state["current_job"],
        "error": _state.get("load_error"),
        "heartbeat": time.time(),
    }


def publish_heartbeat() -> None:
    r = _redis()
    p = r.pipeline(transaction=False)
    p.set(Keys.worker(worker_name()), json.dumps(_worker_record()), ex=settings.HEARTBEAT_TTL)
    p.zadd(Keys.WORKERS, {worker_name(): time.time()})
    job = _state["current_job"]
    if job:
        p.set(Keys.heartbeat(job), worker_name(), ex=settings.HEARTBEAT_TTL)
    p.execute()


def _start_heartbeat() -> None:
    if _state["heartbeat"] is not None:
        return

    def beat() -> None:
        while True:
            try:
                publish_heartbeat()
            except redis.RedisError as exc:  # keep beating through a Redis hiccup
                log.warning("heartbeat failed: %s", exc)
            time.sleep(settings.HEARTBEAT_SECONDS)

    t = threading.Thread(target=beat, name="framepack-heartbeat", daemon=True)
    _state["heartbeat"] = t
    t.start()


def _load_or_report() -> None:
    """Load at start; a failure (missing weights...) must not crash-loop the pool: it is
    published with the heartbeat (``/readyz`` shows it) and every job fails with it."""
    try:
        load_models()
    except Exception as exc:  # noqa: BLE001
        _state["load_error"] = _readable(exc)
        log.error("framepack worker cannot load its model: %s", _state["load_error"])
    _start_heartbeat()


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:  # prefork child: load after the fork
    """Load in the background: the pool kills a child that has not said it is up within
    ``worker_proc_alive_timeout`` seconds, and real weights take minutes to load.  Until
    then the heartbeat says ``ready: false``; a task that arrives first waits for the load
    (``load_models`` holds the lock while loading)."""
    _state.pop("redis", None)  # never share a connection across a fork
    _start_heartbeat()
    threading.Thread(target=_load_or_report, name="framepack-loader", daemon=True).start()


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    _state["pool"] = str(getattr(sender, "pool_cls", "")).lower()


@worker_ready.connect
def _on_ready(**_: Any) -> None:  # solo/threads pools run tasks in this very process
    if "prefork" not in _state.get("pool", "prefork"):
        _load_or_report()


# -- reporting --------------------------------------------------------------------------
class Reporter:
    """Generation events -> ``update_state`` metas with a gap-free ``seq``, throttled."""

    def __init__(self, task: Task, job_id: str, jobs: JobStore, started_at: float, seq: int = 0):
        self.task, self.job_id, self.jobs = task, job_id, jobs
        self.seq = seq  # a redelivered job continues its predecessor's sequence
        self.last_sent = 0.0
        self.last_feed = 0.0
        self.fields: dict[str, Any] = {"started_at": started_at, "sections_done": [], "progress": 0.0}
        self._preview = None

    def send(self, event: str, state: JobState = JobState.RUNNING, extra: dict | None = None) -> dict:
        self.seq += 1
        if self._preview is not None:  # base64 only what is sent
            p = self._preview
            self.fields["preview"] = preview_field(
                base64.b64encode(p.jpeg).decode(), p.frames, p.tile_width, p.tile_height
            )
            self._preview = None
        meta = make_meta(self.seq, state, event=event, **self.fields, **(extra or {}))
        self.task.update_state(state=STATE_TO_CELERY[state], meta=meta)
        self.jobs.set_seq(self.job_id, self.seq)
        self.last_sent = time.monotonic()
        if state is JobState.RUNNING:
            self._flower(meta)
        return meta

    def _flower(self, meta: dict) -> None:
        """``update_state`` emits no event; Flower learns of progress from this one."""
        fields = {k: meta.get(k) for k in ("seq", "stage", "progress", "step", "steps", "section", "sections", "eta")}
        try:
            self.task.send_event("task-progress", **fields)
        except Exception:  # events disabled or broker hiccup: progress still flows
            pass
        now = time.monotonic()
        if now - self.last_feed >= 1.0:
            self.last_feed = now
            self.jobs.publish_event({"job_id": self.job_id, "state": "running", "seq": meta["seq"], **fields})

    def on_event(self, e: Any) -> None:
        from diffusers_helper import events as ev

        if isinstance(e, ev.Stage):
            self.fields.update(stage=e.text, message=e.text)
            self.send("stage")
        elif isinstance(e, ev.PreviewReady):
            self._preview = e.preview
        elif isinstance(e, ev.Progress):
            self.fields.update(
                stage="Sampling", message=e.message, progress=round(e.progress, 5), step=e.step, steps=e.steps,
                section=e.section, sections=e.sections, eta=e.eta_seconds,
            )  # fmt: skip
            if e.step == e.steps or time.monotonic() - self.last_sent >= settings.PROGRESS_INTERVAL:
                self.send("progress")
        elif isinstance(e, ev.SectionDone):
            self.fields["sections_done"] = self.fields["sections_done"] + [
                {"section": e.section, "frames": e.frames, "seconds": round(e.seconds, 3), "file": e.path.name}
            ]
            self.fields["message"] = e.message
            self.send("section")


def _exception_for(record: dict[str, Any]) -> dict[str, Any]:
    state = JobState(record["state"])
    if state is JobState.CANCELLED:
        return exception_fields("TaskRevokedError", "cancelled")
    if state is JobState.FAILED:
        return exception_fields("RuntimeError", record.get("error") or "failed")
    return {}


def _finish(reporter: Reporter, jobs: JobStore, state: JobState, result: dict | None, error: str | None) -> dict:
    record = jobs.get(reporter.job_id) or {}
    if record.get("state") in {s.value for s in TERMINAL}:
        return {}  # already finished elsewhere (a stalled job the web tier failed): keep that verdict
    extra: dict[str, Any] = {"finished_at": time.time()}
    if result is not None:
        extra["result"] = result
    if error is not None:
        extra["error"] = error
    extra.update(_exception_for({"state": state.value, "error": error}))
    jobs.mark_finished(reporter.job_id, state, result, error)
    meta = reporter.send("final", state, extra)
    jobs.publish_event({"job_id": reporter.job_id, "state": state.value, "seq": meta["seq"], "error": error})
    return meta


def _open_image(data: bytes | None, what: str) -> Any:
    from PIL import Image

    if data is None:
        raise ValueError(f"{what} is missing (expired or never stored)")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _readable(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return "GPU out of memory: try a shorter video, a smaller resolution or more gpu_memory_preservation"
    if isinstance(exc, SoftTimeLimitExceeded):
        return "time limit exceeded"
    return f"{name}: {exc}" if str(exc) else name


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def generate_video(self: Task, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one job; every outcome is written as our final meta with the next ``seq``."""
    jobs = store()
    record = jobs.get(job_id)
    if record is None:
        raise Ignore()  # deleted or expired while queued
    if JobState(record["state"]) in TERMINAL:
        # Cancelled while queued: the web tier wrote the final, then Celery's STARTED (task
        # tracking) overwrote it.  Write it back under the same seq; watchers dedupe by seq.
        Reporter(self, job_id, jobs, time.time(), record["seq"] - 1).send(
            "final", JobState(record["state"]), {"error": record.get("error"), **_exception_for(record)}
        )
        raise Ignore()
    reporter = Reporter(self, job_id, jobs, time.time(), record["seq"])

    if jobs.cancel_requested(job_id):  # cancelled while queued: never starts
        _finish(reporter, jobs, JobState.CANCELLED, None, None)
        raise Ignore()
    attempts = jobs.mark_started(job_id, worker_name())
    _state["current_job"] = job_id
    jobs.publish_event({"job_id": job_id, "state": "running", "seq": 0})
    try:
        if attempts > 1 + settings.MAX_REDELIVERIES:
            _finish(reporter, jobs, JobState.FAILED, None, f"worker lost (delivered {attempts} times)")
            raise Ignore()
        return _run(self, reporter, jobs, job_id, params)
    finally:
        _state["current_job"] = None


def _run(task: Task, reporter: Reporter, jobs: JobStore, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    from diffusers_helper.generate import OutputLayout, generate
    from diffusers_helper.params import JobParams

    out_dir = settings.results_dir() / job_id
    try:
        models = load_models()
        job = JobParams.model_validate(params)
        image_bytes, end_bytes = jobs.read_input(job_id)
        image = _open_image(image_bytes, "input image")
        end_image = _open_image(end_bytes, "end image") if end_bytes is not None else None
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / INPUT_FILE).write_bytes(image_bytes)
        result = generate(
            job, image, reporter.on_event, lambda: jobs.cancel_requested(job_id),
            models=models, output=OutputLayout(out_dir, "video"), end_image=end_image,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 — every failure becomes a readable final state
        log.exception("job %s failed", job_id)
        _finish(reporter, jobs, JobState.FAILED, None, _readable(exc))
        raise Ignore() from None

    summary = {
        "video": result.video.name if result.video else None,
        "frames": result.frames,
        "seconds": round(result.seconds, 3),
        "seed": result.seed,
        "width": result.width,
        "height": result.height,
        "sections": result.sections,
        "timings": result.timings,
        "cache_skipped_steps": result.cache_skipped_steps,
        "profile": models.profile.name,
    }
    if result.status == "cancelled" or (jobs.get(job_id) or {}).get("state") != JobState.RUNNING.value:
        _finish(reporter, jobs, JobState.CANCELLED, summary, None)  # no-op if already finished elsewhere
        raise Ignore()
    reporter.fields["progress"] = 1.0
    jobs.mark_finished(job_id, JobState.SUCCEEDED, summary, None)
    reporter.seq += 1
    jobs.set_seq(job_id, reporter.seq)
    meta = make_meta(reporter.seq, JobState.SUCCEEDED, event="final", **reporter.fields, result=summary,
                     finished_at=time.time())  # fmt: skip
    jobs.publish_event({"job_id": job_id, "state": "succeeded", "seq": meta["seq"]})
    return meta  # Celery stores it as SUCCESS (GET + SETEX + PUBLISH, like update_state)
