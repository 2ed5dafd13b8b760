"""What a client sees of a job: the typed snapshot and summary (torch- and Flask-free).

A snapshot merges the job record (``fp:job:<id>``), the latest worker update (Celery's
``celery-task-meta-<id>``) and the queue position.  :func:`build_snapshot` is a pure function
of those: reading a job never changes it (the background sweep in :mod:`tasks.sweeper`
is what ends stalled jobs).  The models here also generate the OpenAPI schemas
(``webapp/openapi.py``), so the document and the replies cannot drift apart.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .protocol import ORIGINAL_STATUS, TERMINAL, JobState, latest_seq


class Links(BaseModel):
    self: str
    ws: str
    video: str
    input: str
    cancel: str
    extend: str
    page: str


def job_links(job_id: str) -> dict[str, str]:
    return {
        "self": f"/api/jobs/{job_id}",
        "ws": f"/ws/jobs/{job_id}",
        "video": f"/api/jobs/{job_id}/video",
        "input": f"/api/jobs/{job_id}/input",
        "cancel": f"/api/jobs/{job_id}/cancel",
        "extend": f"/api/jobs/{job_id}/extend",
        "page": f"/jobs/{job_id}",
    }


class Preview(BaseModel):
    image: str = Field(description="data:image/jpeg;base64,… strip of `frames` tiles side by side")
    frames: int
    tile_width: int
    tile_height: int


class SectionDone(BaseModel):
    section: int
    frames: int
    seconds: float
    url: str


class WebhookAttempt(BaseModel):
    at: float = Field(description="When the POST was sent (epoch seconds)")
    status: int | None = Field(description="The receiver's HTTP status; null when it could not be reached")
    ok: bool
    seconds: float
    error: str | None


class WebhookDelivery(BaseModel):
    id: str = Field(description="The webhook-id header: the same for every attempt of this event")
    event: str = Field(description="start | section | completed")
    state: str = Field(description="pending | delivered | failed (given up)")
    created_at: float
    next_at: float = Field(description="When the next attempt is due (pending deliveries)")
    delivered_at: float | None = None
    attempts: list[WebhookAttempt]


class Webhook(BaseModel):
    url: str
    events: list[str]
    deliveries: list[WebhookDelivery] = Field(description="Every event sent or to send, in order, with its attempts")


class CacheReport(BaseModel):
    mode: str = Field(description="none | first_block | mag")
    threshold: float | None
    transformer_calls: int
    skipped: int = Field(description="Transformer calls the step cache skipped")


class JobResult(BaseModel):
    """What a job made: built by the worker (``tasks/job.py``) when the job ends, stored in its
    record; the snapshot shows it with ``video_url`` instead of the file name ``video``.  Every
    field may be absent: a cancelled job's result, and records of older workers."""

    model_config = ConfigDict(title="JobResult", extra="allow")  # records of older workers keep theirs

    video: str | None = Field(None, description="The final video's file name in the results store (not in snapshots)")
    video_url: str | None = Field(None, description="Where to download the final video (succeeded jobs)")
    frames: int | None = None
    seconds: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    sections: int | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage; per_step: sampling "
                                      "seconds per step")  # fmt: skip
    cache_skipped_steps: int | None = None
    cache: CacheReport | None = None
    speed: dict[str, str] | None = Field(None, description="The worker's speed options: compile, quant, attention")
    profile: str | None = None
    loras: list[dict[str, Any]] = Field(default_factory=list)
    resumed_from_section: int | None = Field(None, description="Sections a redelivery restored, not ran again")
    extends: str | None = None
    extended_sections: int | None = None


class JobSnapshot(BaseModel):
    """The snapshot of one job (``GET /api/jobs/<id>``, WebSocket ``snapshot.job``)."""

    model_config = ConfigDict(title="Job", extra="forbid")  # build_snapshot and this model cannot drift

    id: str
    state: JobState
    status: str = Field(description="The original API's word for the state")
    position: int | None = Field(description="1-based FIFO position while queued")
    stalled: bool = Field(description="running, but no heartbeat from its worker")
    seq: int
    progress: float = Field(ge=0, le=1)
    stage: str | None
    message: str | None
    step: int | None
    steps: int | None
    section: int | None
    sections: int | None
    eta: float | None
    preview: Preview | None
    sections_done: list[SectionDone]
    result: JobResult | None
    error: str | None = Field(description="Why a job failed")
    reason: str | None = Field(description="Why a job ended without succeeding (cancelled or failed)")
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    updated_at: float | None
    attempts: int
    worker: str | None
    params: dict[str, Any] | None
    profile: str | None
    batch: str | None = Field(description="The batch it was submitted in")
    extends: str | None = Field(description="The finished job whose video this one continues")
    owner: str | None = Field(description="The name of the API token that submitted it (null when the API is open)")
    webhook: Webhook | None
    links: Links

    def wire(self) -> dict[str, Any]:
        """As clients get it: JSON types, the result without its file name."""
        return self.model_dump(mode="json", exclude={"result": {"video"}})


class JobSummary(BaseModel):
    """One row of ``GET /api/jobs`` and of the ``/ws/jobs`` feed."""

    model_config = ConfigDict(title="JobSummary")

    id: str
    state: JobState
    status: str
    position: int | None
    progress: float = Field(ge=0, le=1)
    section: int | None
    sections: int | None
    stalled: bool
    error: str | None
    reason: str | None
    created_at: float | None
    finished_at: float | None
    batch: str | None
    owner: str | None
    prompt: str
    links: Links


class JobList(BaseModel):
    jobs: list[JobSummary]
    total: int
    offset: int
    limit: int
    next: str | None


def decorate(job_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A worker meta as clients see it: section and video URLs instead of file names, no
    ``exc_*`` keys (those are for Celery's ``AsyncResult``)."""
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


def build_snapshot(
    record: dict[str, Any],
    latest: tuple[JobState, dict[str, Any]] | None,
    *,
    position: int | None,
    alive: bool,
    heartbeat_ttl: float,
    now: float | None = None,
    deliveries: list[dict[str, Any]] | None = None,
) -> JobSnapshot:
    """The snapshot, from what is stored.  The record's state is the truth once it is
    terminal (the lifecycle writes record and meta together); before that, a terminal meta
    (written by Celery itself: revoke, terminate) wins.  ``deliveries`` is the job's webhook
    log (:func:`tasks.webhooks.deliveries`)."""
    now = time.time() if now is None else now
    job_id = record["id"]
    meta = decorate(job_id, latest[1]) if latest else {}
    state = JobState(record["state"])
    if state not in TERMINAL and latest and latest[0] in TERMINAL:
        state = latest[0]
    stalled = False
    if state is JobState.RUNNING and not alive:
        last = max(record.get("started_at") or 0, meta.get("emitted_at") or 0)
        stalled = now - last > heartbeat_ttl
    result = record.get("result")
    view = {
        "id": job_id,
        "state": state.value,
        "status": ORIGINAL_STATUS[state],
        "position": position if state is JobState.QUEUED else None,
        "stalled": stalled,
        "seq": latest_seq(record, meta),
        "progress": 1.0 if state is JobState.SUCCEEDED else min(1.0, max(0.0, float(meta.get("progress") or 0.0))),
        "stage": meta.get("stage"),
        "message": meta.get("message"),
        "step": meta.get("step"),
        "steps": meta.get("steps"),
        "section": meta.get("section"),
        "sections": meta.get("sections"),
        "eta": meta.get("eta"),
        "preview": meta.get("preview"),
        "sections_done": meta.get("sections_done", []),
        "result": decorate(job_id, {"state": state.value, "result": result})["result"] if result else None,
        "error": record.get("error") or meta.get("error"),
        "reason": record.get("reason") or meta.get("reason"),
        "created_at": record.get("created_at"),
        "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "updated_at": meta.get("emitted_at"),
        "attempts": record.get("attempts", 0),
        "worker": record.get("worker"),
        "params": record.get("params"),
        "profile": record.get("profile"),
        "batch": record.get("batch"),
        "extends": record.get("extends"),
        "owner": record.get("owner"),
        "webhook": {**hook, "deliveries": deliveries or []} if (hook := record.get("webhook")) else None,
        "links": job_links(job_id),
    }
    return JobSnapshot.model_validate(view)


class EntryError(BaseModel):
    """A batch entry refused at submit (the others run)."""

    index: int
    field: str | None
    message: str


class BatchSnapshot(BaseModel):
    """A batch (``GET /api/batches/<id>``): its jobs, and how many are in each state."""

    model_config = ConfigDict(title="Batch")

    id: str
    owner: str | None = Field(description="The name of the API token that submitted it (null when the API is open)")
    created_at: float
    total: int
    counts: dict[str, int]
    done: bool = Field(description="every job of the batch has ended")
    errors: list[EntryError]
    jobs: list[JobSummary]
    links: dict[str, str]


def build_batch(batch_id: str, record: dict[str, str], jobs: list[dict[str, Any]]) -> BatchSnapshot:
    """The batch's snapshot from its record (``fp:batch:<id>``) and its jobs' summaries."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["state"]] = counts.get(job["state"], 0) + 1
    return BatchSnapshot(id=batch_id, owner=record.get("owner") or None, created_at=float(record["created_at"]),
                     total=len(jobs), counts=counts, done=all(JobState(j["state"]) in TERMINAL for j in jobs),
                     errors=json.loads(record["errors"]), jobs=jobs, links=batch_links(batch_id))  # fmt: skip


def batch_links(batch_id: str) -> dict[str, str]:
    return {"self": f"/api/batches/{batch_id}", "cancel": f"/api/batches/{batch_id}/cancel",
            "page": f"/batches/{batch_id}"}  # fmt: skip


SUMMARY_FIELDS = tuple(f for f in JobSummary.model_fields if f != "prompt")


def summary_of(view: JobSnapshot | dict[str, Any]) -> dict[str, Any]:
    """The list/feed row of a snapshot (:class:`JobSummary`, as clients get it)."""
    wire = view.model_dump(mode="json", include={*SUMMARY_FIELDS, "params"}) if isinstance(view, JobSnapshot) else view
    out = {k: wire[k] for k in SUMMARY_FIELDS}
    out["prompt"] = (wire.get("params") or {}).get("prompt", "")
    return out
