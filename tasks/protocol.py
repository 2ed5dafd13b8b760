"""The whole wire protocol in one screen: job states, Redis keys, update meta, messages.

Imports neither torch nor Flask: the worker, the web tier, the client and the benchmarks
all read it.

Flow of one update: the worker calls ``update_state(state, meta)``; Celery's Redis backend
writes ``celery-task-meta-<job_id>`` (GET + SETEX + PUBLISH) with ``{"status": <celery
state>, "result": <meta>, ...}``.  Every meta carries a per-job ``seq`` (+1 per update, no
gaps) and the worker's emit time.  The web tier turns each into one WebSocket message
(``progress``, ``section`` or ``final``, with the same ``seq``) and fans it out.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1
TASK_NAME = "tasks.generate_video"
QUEUE = "gpu"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

#: Celery's states onto ours.
CELERY_TO_STATE: dict[str, JobState] = {
    "PENDING": JobState.QUEUED,
    "RECEIVED": JobState.QUEUED,
    "STARTED": JobState.RUNNING,
    "PROGRESS": JobState.RUNNING,
    "RETRY": JobState.RUNNING,
    "SUCCESS": JobState.SUCCEEDED,
    "FAILURE": JobState.FAILED,
    "REVOKED": JobState.CANCELLED,
}
#: Ours onto the Celery state the worker writes (the inverse, for the states it writes).
STATE_TO_CELERY: dict[JobState, str] = {
    JobState.QUEUED: "PENDING",
    JobState.RUNNING: "PROGRESS",
    JobState.SUCCEEDED: "SUCCESS",
    JobState.FAILED: "FAILURE",
    JobState.CANCELLED: "REVOKED",
}
#: The original FramePack API's words for the same states (``failed`` gets `` - <why>``).
ORIGINAL_STATUS: dict[JobState, str] = {
    JobState.QUEUED: "pending",
    JobState.RUNNING: "processing",
    JobState.SUCCEEDED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


# -- Redis keys -------------------------------------------------------------------------
#: Why a submission was refused (``framepack_jobs_refused_total{reason}``): a queue limit
#: (everyone's, or the caller's token's), or its input (a 4xx naming a field).
REFUSALS = ("queue", "token", "invalid")


class Keys:
    """Every Redis key and channel name of ours (Celery's own are named here too)."""

    PREFIX = "fp"
    JOBS = "fp:jobs"  # ZSET job_id -> created (epoch); listing, newest first
    QUEUED = "fp:queued"  # ZSET job_id -> submit number; FIFO positions
    RUNNING = "fp:running"  # ZSET job_id -> started (epoch); /queue's "processing", stall sweep
    SUBMITTED = "fp:submitted"  # counter giving submit numbers
    WORKERS = "fp:workers"  # ZSET worker name -> last heartbeat (epoch)
    EVENTS = "fp:events"  # pub/sub: state changes of all jobs (for /ws/jobs)
    HUB = "fp:hub"  # pub/sub: never published; keeps a web process's reader subscribed
    SWEEPER = "fp:sweeper"  # STRING (short TTL): which process runs the background sweep
    MISSING = "fp:missing"  # HASH job_id -> first sweep that found its message gone from the broker
    OWNERS = "fp:owners"  # SET: names of every token that submitted (their indexes below)
    WEBHOOKS_DUE = "fp:webhooks"  # ZSET job_id -> when its next webhook delivery is due (sweep re-dispatches)
    STATS = "fp:stats"  # HASH counters for /metrics (never expire): submitted, finished:<state>, refused:<reason>
    STATS_SUBMITTED = "submitted"  # field of STATS: jobs stored (SUBMITTED also counts refused tries)

    @staticmethod
    def stats_finished(state: str) -> str:  # field of STATS
        return f"finished:{state}"

    @staticmethod
    def stats_refused(reason: str) -> str:  # field of STATS: submissions refused, by REFUSALS reason
        return f"refused:{reason}"

    @staticmethod
    def job(job_id: str) -> str:  # HASH: the job record (see JOB_FIELDS)
        return f"fp:job:{job_id}"

    @staticmethod
    def input(job_id: str) -> str:  # normalised start image (PNG bytes)
        return f"fp:job:{job_id}:input"

    @staticmethod
    def end_image(job_id: str) -> str:  # normalised end image (PNG bytes)
        return f"fp:job:{job_id}:end"

    @staticmethod
    def cancel(job_id: str) -> str:  # exists = cancel requested
        return f"fp:job:{job_id}:cancel"

    @staticmethod
    def heartbeat(job_id: str) -> str:  # exists (short TTL) while a worker runs the job
        return f"fp:job:{job_id}:heartbeat"

    @staticmethod
    def webhook_log(job_id: str) -> str:  # LIST of JSON: the job's webhook events and their attempts
        return f"fp:job:{job_id}:webhook"

    @staticmethod
    def webhook_lock(job_id: str) -> str:  # exists (short TTL) while one process delivers the job's webhooks
        return f"fp:job:{job_id}:webhook:lock"

    @staticmethod
    def owner_jobs(owner: str) -> str:  # ZSET job_id -> created (epoch): one token's jobs, for its listing
        return f"fp:owner:{owner}:jobs"

    @staticmethod
    def owner_queued(owner: str) -> str:  # ZSET job_id -> submit number: one token's queued jobs (its limit)
        return f"fp:owner:{owner}:queued"

    @staticmethod
    def worker(name: str) -> str:  # JSON: profile, variants, queues, busy job (short TTL)
        return f"fp:worker:{name}"

    @staticmethod
    def batch(batch_id: str) -> str:  # HASH: id, created_at, count, errors (JSON: entries refused at submit)
        return f"fp:batch:{batch_id}"

    @staticmethod
    def batch_jobs(batch_id: str) -> str:  # LIST: the batch's job ids, in submission order
        return f"fp:batch:{batch_id}:jobs"

    @staticmethod
    def celery_meta(job_id: str) -> str:  # Celery's result key *and* pub/sub channel
        return f"celery-task-meta-{job_id}"


CELERY_META_PREFIX = "celery-task-meta-"
#: The normalised input image as the worker saves it next to the video (<results>/<id>/).
INPUT_FILE = "input.png"
#: A job's last section checkpoint in its results (``OutputLayout(dir, "video").checkpoint``
#: of :mod:`diffusers_helper.generate`): what a resumed or an extending job continues from.
CHECKPOINT_FILE = "video-checkpoint.safetensors"

#: Fields of the job record hash (all strings in Redis; JSON where noted).
JOB_FIELDS = (
    "id",
    "state",
    "params",  # JSON: the validated JobParams (seed concrete)
    "profile",  # profile name the job was submitted against
    "created_at",
    "started_at",
    "finished_at",
    "attempts",  # deliveries to a worker (redelivery after a lost worker counts)
    "worker",
    "error",  # why a job failed (failed jobs only)
    "reason",  # why a job ended other than by succeeding: the error, or who cancelled it
    "result",  # JSON: final summary (video, frames, seconds, seed, sections)
    "seq",  # the last update's seq (a redelivered run goes on from it)
    "batch",  # the batch the job was submitted in, if any
    "extends",  # the finished job whose video this one continues, if any
    "owner",  # the name of the API token that submitted it (absent when the API is open)
    "webhook",  # JSON: {"url", "events"} when the job asked to be called back
)



# -- update meta (what the worker writes with update_state) -----------------------------
def latest_seq(record: dict[str, Any] | None, meta: dict[str, Any] | None) -> int:
    """A job's ``seq`` so far: the higher of its record's (the lifecycle's writes) and its
    latest update's (the worker's).  Every update and end takes the next one after it."""
    return max(int((record or {}).get("seq") or 0), int((meta or {}).get("seq") or 0))


def make_meta(
    seq: int,
    state: JobState,
    *,
    event: str,
    **fields: Any,
) -> dict[str, Any]:
    """One worker update.  ``event`` says why it was sent: ``stage`` | ``progress`` |
    ``section`` | ``final``.  ``fields`` are the snapshot fields below.

    Snapshot fields (all optional): ``stage``, ``message``, ``progress`` (0..1), ``step``,
    ``steps``, ``section``, ``sections``, ``eta`` (seconds), ``preview`` (see
    :func:`preview_field`), ``sections_done`` (list of ``{"section", "frames",
    "seconds"}``), ``started_at``, ``result``, ``error``.
    """
    head = {"v": PROTOCOL_VERSION, "seq": seq, "state": state.value, "event": event, "emitted_at": time.time()}
    return {**head, **fields}


def preview_field(jpeg_b64: str, frames: int, tile_width: int, tile_height: int) -> dict[str, Any]:
    return {
        "image": f"data:image/jpeg;base64,{jpeg_b64}",
        "frames": frames,
        "tile_width": tile_width,
        "tile_height": tile_height,
    }


def exception_fields(exc_type: str, message: str) -> dict[str, Any]:
    """Keys Celery needs to rebuild an exception from FAILURE/REVOKED metas (so Flower and
    ``AsyncResult`` still work when our own fields ride along)."""
    module = "celery.exceptions" if exc_type == "TaskRevokedError" else "builtins"
    return {"exc_type": exc_type, "exc_module": module, "exc_message": [message]}


def celery_document(job_id: str, state: JobState, meta: dict[str, Any]) -> str:
    """What Celery's Redis result backend stores under ``celery-task-meta-<id>`` (and
    publishes on the same channel), for a meta of ours.  Terminal metas carry the keys
    Celery needs to rebuild an exception (``AsyncResult``, Flower)."""
    result = dict(meta)
    if state is JobState.CANCELLED:
        result.update(exception_fields("TaskRevokedError", meta.get("reason") or "cancelled"))
    elif state is JobState.FAILED:
        result.update(exception_fields("RuntimeError", meta.get("error") or "failed"))
    doc = {"status": STATE_TO_CELERY[state], "result": result, "traceback": None, "children": [],
           "date_done": _iso(meta.get("finished_at")) if state in TERMINAL else None, "task_id": job_id}  # fmt: skip
    return json.dumps(doc, separators=(",", ":"))


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat()


# -- why a job ended (the reason field) -------------------------------------------------
class Reason:
    """The readable reasons a job ends other than by succeeding (``reason`` field)."""

    CANCELLED = "cancelled by user"
    REVOKED = "revoked by operator (celery control revoke)"
    TERMINATED = "terminated by operator (celery control terminate, signal {signum})"
    EXPIRED = "expired before it started"
    PURGED = "purged from the broker (celery purge)"
    STALLED = "worker lost (no heartbeat for {seconds:.0f} s)"
    REDELIVERED = "worker lost (delivered {attempts} times)"


# -- what Flower sees ---------------------------------------------------------------------
def progress_text(meta: dict[str, Any]) -> str:
    """One line a person reads in Flower's Result column while a job runs."""
    parts = [f"{100 * float(meta.get('progress') or 0):.0f}%"]
    if meta.get("section") and meta.get("sections"):
        parts.append(f"section {meta['section']}/{meta['sections']}")
    if meta.get("step") and meta.get("steps"):
        parts.append(f"step {meta['step']}/{meta['steps']}")
    elif meta.get("stage"):
        parts.append(str(meta["stage"]))
    if meta.get("eta") is not None:
        parts.append(f"eta {float(meta['eta']):.0f} s")
    return " · ".join(parts)


def flower_event(state: JobState, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Celery task event that shows ``meta`` in Flower (``celery.events.state``).

    Progress is re-announced as ``task-started`` (the real start time as timestamp, the
    progress line as ``result``): Flower shows ``result``, and STARTED ranks below every end
    state, so a later ``task-revoked`` still shows REVOKED.  (A custom ``task-progress``
    state would outrank REVOKED and hide every cancel.)  Every end event carries a ``result``
    too, replacing the last progress line in Flower's Result column."""
    if state is JobState.RUNNING:
        return "task-started", {"timestamp": meta.get("started_at") or time.time(), "result": progress_text(meta)}
    if state is JobState.FAILED:
        error = meta.get("error") or "failed"
        return "task-failed", {"exception": f"RuntimeError({error!r})", "traceback": "", "result": f"failed: {error}"}
    if state is JobState.CANCELLED:
        reason = meta.get("reason") or "cancelled"
        return "task-revoked", {"terminated": False, "signum": None, "expired": False, "result": reason}
    return "task-succeeded", {"result": result_text(meta), "runtime": _runtime(meta)}


def result_text(meta: dict[str, Any]) -> str:
    """The short summary a succeeded job shows in Flower (not the whole meta with its preview)."""
    r = meta.get("result") or {}
    return f"{r.get('frames')} frames, {r.get('seconds')} s, {r.get('width')}x{r.get('height')}, seed {r.get('seed')}"


def _runtime(meta: dict[str, Any]) -> float | None:
    start, end = meta.get("started_at"), meta.get("finished_at")
    return round(end - start, 3) if start and end else None


# -- the all-jobs feed (fp:events) ------------------------------------------------------
FEED_EVENTS = ("submitted", "started", "progress", "finished", "deleted")


def feed_event(event: str, job_id: str, state: JobState | None, *, seq: int = 0, left_position: int | None = None,
               summary: dict[str, Any] | None = None, owner: str | None = None, **fields: Any) -> str:  # fmt: skip
    """One ``/ws/jobs`` message: what happened to which job, its ``summary`` row (same shape
    as ``GET /api/jobs`` rows) when the publisher has it, and ``left_position``, the queue
    position a job held when it left the queue (every queued job behind it moves up one).
    ``owner`` (the submitting token's name) lets each web process show a user only theirs."""
    assert event in FEED_EVENTS
    body = {"type": "job", "event": event, "job_id": job_id, "state": state and state.value, "seq": seq,
            "left_position": left_position, "owner": owner, **fields}  # fmt: skip
    if summary is not None:
        body["job"] = summary
    return json.dumps(body, separators=(",", ":"))


def parse_celery_payload(raw: bytes | str) -> tuple[JobState, dict[str, Any]]:
    """``celery-task-meta-*`` JSON -> (our state, our meta).

    Metas written by Celery itself (a bare STARTED, or a FAILURE from an exception that
    escaped) lack ``seq``; they are returned with ``seq`` absent.
    """
    doc = json.loads(raw)
    status = doc.get("status", "PENDING")
    result = doc.get("result")
    meta = dict(result) if isinstance(result, dict) else {}
    state = JobState(meta["state"]) if "state" in meta else CELERY_TO_STATE.get(status, JobState.QUEUED)
    if state is JobState.FAILED and "error" not in meta:
        meta["error"] = _celery_error(result)
    return state, meta


def _celery_error(result: Any) -> str:
    if isinstance(result, dict):
        msg = result.get("exc_message")
        if isinstance(msg, list | tuple):
            msg = " ".join(str(m) for m in msg)
        return f"{result.get('exc_type', 'Error')}: {msg}"
    return str(result)


# -- WebSocket / SSE messages -----------------------------------------------------------
MESSAGE_TYPES = ("snapshot", "progress", "section", "final")


def message_type(meta: dict[str, Any]) -> str:
    """The WebSocket message type that carries an update."""
    if meta.get("state") in {s.value for s in TERMINAL}:
        return "final"
    if meta.get("event") == "section":
        return "section"
    return "progress"


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))
