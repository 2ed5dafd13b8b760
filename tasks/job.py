"""The ``tasks.generate_video`` task: one job, from its delivery to its end.

The task asks :class:`tasks.lifecycle.Lifecycle` whether the job runs (a duplicate or an
ended job's delivery is dropped), turns generation events into ``update_state`` calls
(:class:`tasks.reporter.Reporter`, following :mod:`tasks.protocol`) and stores files as
they are written (:class:`tasks.uploader.Uploader`), then ends the job through the
lifecycle.  Celery stores nothing of this task itself (``ignore_result``): every result
document is the lifecycle's.  The worker process it runs in (models, heartbeat, signals)
is :mod:`tasks.worker`.

Redis outages: sampling never waits on Redis (the reporter writes updates from its own
thread, latest progress wins), the cancel check treats an unreachable Redis as "not
cancelled", and the job's end is retried until Redis answers
(``FRAMEPACK_FINAL_RETRY_SECONDS``).
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import Ignore

from .lifecycle import Lifecycle, worker_name
from .logs import job_context
from .metrics import chain
from .protocol import (
    CHECKPOINT_FILE,
    INPUT_FILE,
    TASK_NAME,
    TERMINAL,
    JobState,
    Keys,
    Reason,
    flower_event,
    latest_seq,
    result_text,
)
from .reporter import Reporter
from .results import StoreUnavailable
from .snapshot import CacheReport, JobResult
from .uploader import Uploader
from .worker import load_models, readable, state

log = logging.getLogger("framepack.worker")


def _open_image(data: bytes | None, what: str) -> Any:
    from PIL import Image

    if data is None:
        raise ValueError(f"{what} is missing (expired or never stored)")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _cancel_check(job_id: str) -> Any:
    """The per-step cancel check: an unreachable Redis means "not cancelled" (the job goes
    on through an outage; a cancel sent meanwhile is seen once Redis is back)."""

    def cancelled() -> bool:
        try:
            return bool(state().quick.exists(Keys.cancel(job_id)))
        except redis.RedisError:
            state().metrics.redis_errors.labels("cancel_check").inc()
            return False

    return cancelled


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate_video(self: Task, job_id: str, _params: dict[str, Any] | None = None) -> str | None:
    """Run one job.  Returns the short summary Flower shows; the full final meta is the
    lifecycle's result document.  The message carries the job id only: the parameters are
    the job record's (messages queued before 2026-12-04 also carried them: ignored)."""
    with job_context(job_id):
        return _deliver(self, job_id)


def _deliver(self: Task, job_id: str) -> str | None:
    lc = state().lifecycle(self)
    start = lc.start(job_id, worker_name())
    if start.verdict == "ended" and start.record and JobState(start.record["state"]) in TERMINAL:
        # Ended before it could run (cancelled while queued, revoked, purged, delivered
        # too often): Flower saw Celery's task-started for this delivery, so it hears the end.
        event, fields = flower_event(JobState(start.record["state"]), start.record)
        self.send_event(event, **fields)
    if not start.runs:
        if start.verdict == "duplicate":
            log.warning("job %s is running on %s: this delivery is dropped", job_id, start.record.get("worker"))
        raise Ignore()
    record = start.record or {}
    raw = lc.r.get(Keys.celery_meta(job_id))
    previous = ((json.loads(raw) if raw else {}).get("result") or {}) if start.attempts > 1 else {}
    last_seq = latest_seq(record, previous)
    reporter = Reporter(self, job_id, lc, record.get("started_at") or time.time(), last_seq,
                        attempts=start.attempts, hostname=self.request.hostname,
                        progress_interval=state().settings.progress_interval, record=record,
                        sections_done=previous.get("sections_done") or [],
                        on_drop=state().metrics.redis_errors.labels("update").inc)  # fmt: skip
    uploader = Uploader(state().store, job_id, reporter.on_event, state().metrics)
    state().current_job = job_id
    state().metrics.busy.set(1)
    began = time.monotonic()
    outcome = JobState.FAILED
    log.info("job %s runs on %s (delivery %d)", job_id, worker_name(), start.attempts)
    try:
        outcome, text = _run(reporter, uploader, lc, job_id, record.get("params") or {}, record.get("extends"))
    finally:
        reporter.close()
        uploader.release()
        state().current_job = None
        state().metrics.busy.set(0)
        state().metrics.jobs.labels(outcome.value).inc()
        state().metrics.job_seconds.labels(outcome.value).observe(time.monotonic() - began)
        log.info("job %s %s in %.1f s", job_id, outcome.value, time.monotonic() - began)
    if text is None:  # ended other than by succeeding: the lifecycle wrote (and announced) the end
        raise Ignore()
    return text


def _run(reporter: Reporter, uploader: Uploader, lc: Lifecycle, job_id: str, params: dict[str, Any],
         extends: str | None) -> tuple[JobState, str | None]:  # fmt: skip
    """Generate, store the files, end the job.  Returns how it ended and, for a success,
    Flower's summary (Celery announces task-succeeded with it)."""
    out_dir = uploader.directory
    try:
        models = load_models()  # first: waits for a background load still running
        from diffusers_helper.generate import OutputLayout, generate
        from diffusers_helper.params import JobParams

        job = JobParams.model_validate(params)
        image_bytes, end_bytes = lc.r.get(Keys.input(job_id)), lc.r.get(Keys.end_image(job_id))
        image = _open_image(image_bytes, "input image")
        end_image = _open_image(end_bytes, "end image") if end_bytes is not None else None
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / INPUT_FILE).write_bytes(image_bytes)
        uploader.publish(out_dir / INPUT_FILE)
        output = OutputLayout(out_dir, "video")
        if not output.checkpoint.is_file():  # redelivered to another host: its last checkpoint is in the store
            state().store.local_copy(job_id, CHECKPOINT_FILE, output.checkpoint)
        extend_from = None
        if extends:  # the job it continues: that job's last checkpoint (a download from a bucket)
            extend_from = state().store.local_copy(extends, CHECKPOINT_FILE, out_dir / f".extends-{CHECKPOINT_FILE}")
            if extend_from is None:
                raise ValueError(f"extend: job {extends} has no section checkpoint any more (expired or deleted)")
        result = generate(
            job, image, chain(state().metrics.timer().on_event, uploader.on_event), _cancel_check(job_id),
            models=models, output=output, end_image=end_image, lora_dir=state().settings.lora_dir,
            resume=True,  # a redelivered job goes on after its last section
            extend_from=extend_from,
        )  # fmt: skip
        uploader.finish()  # every file stored before the end is announced
    except Exception as exc:  # noqa: BLE001 — every failure becomes a readable final state
        log.exception("job %s failed", job_id)
        if not isinstance(exc, StoreUnavailable):
            try:
                uploader.finish()  # the sections written before the failure stay downloadable
            except StoreUnavailable as store_exc:
                log.warning("job %s: %s", job_id, store_exc)
        lc.finish_patiently(job_id, JobState.FAILED, error=readable(exc), fields=reporter.close())
        return JobState.FAILED, None

    summary = JobResult(
        video=result.video.name if result.video else None,
        frames=result.frames,
        seconds=round(result.seconds, 3),
        seed=result.seed,
        width=result.width,
        height=result.height,
        sections=result.sections,
        timings=result.timings,
        cache_skipped_steps=result.cache_skipped_steps,
        cache=CacheReport(mode=result.cache_mode, threshold=result.cache_threshold,
                          transformer_calls=result.transformer_calls, skipped=result.cache_skipped_steps),
        speed=result.speed,
        profile=models.profile.name,
        loras=result.loras,
        resumed_from_section=result.resumed_from_section,
        extends=extends,
        extended_sections=result.extended_sections,
    ).model_dump(exclude={"video_url"})  # fmt: skip
    if result.status == "cancelled":
        lc.finish_patiently(job_id, JobState.CANCELLED, reason=Reason.CANCELLED, result=summary,
                            fields=reporter.close())  # fmt: skip
        return JobState.CANCELLED, None
    meta = lc.finish_patiently(job_id, JobState.SUCCEEDED, result=summary, fields=reporter.close(),
                               announce=False)  # fmt: skip
    if meta is None:  # ended meanwhile (a stalled job the sweep failed): that verdict stays
        record = lc.record(job_id) or {}
        return JobState(record.get("state") or JobState.FAILED.value), None
    return JobState.SUCCEEDED, result_text(meta)
