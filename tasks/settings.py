"""Settings shared by the worker and the web tier, from the environment (one place)."""

from __future__ import annotations

import os
from pathlib import Path

import celeryconfig


def store_url() -> str:
    """Redis holding job records: the result backend when it is Redis, else ``REDIS_URL``."""
    backend = celeryconfig.result_backend or ""
    return backend if backend.startswith(("redis://", "rediss://", "unix://")) else celeryconfig.REDIS_URL


def results_dir() -> Path:
    return Path(os.environ.get("RESULTS_DIR", "var/results")).resolve()


def profile_spec() -> str:
    return os.environ.get("FRAMEPACK_PROFILE", "tiny")


#: Seconds between PROGRESS writes; the last step of a section, sections, stages and the
#: end always go through.  10 Hz is plenty for eyes and keeps a fast model off Redis' back.
PROGRESS_INTERVAL = float(os.environ.get("FRAMEPACK_PROGRESS_INTERVAL", "0.1"))
#: A job whose worker died is delivered again at most this many times, then fails.
MAX_REDELIVERIES = int(os.environ.get("FRAMEPACK_MAX_REDELIVERIES", "1"))
#: Worker heartbeat period, and how long a heartbeat counts as alive (then: "stalled").
HEARTBEAT_SECONDS = float(os.environ.get("FRAMEPACK_HEARTBEAT_SECONDS", "5"))
HEARTBEAT_TTL = int(os.environ.get("FRAMEPACK_HEARTBEAT_TTL", "20"))
#: A running job with no heartbeat for this long is failed as "worker lost".
STALL_FAIL_SECONDS = float(os.environ.get("FRAMEPACK_STALL_FAIL_SECONDS", "600"))
#: Finished jobs and their files live this long (Celery's result_expires).
RESULT_TTL = int(celeryconfig.result_expires)
