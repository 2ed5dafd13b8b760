"""Every setting of the service, read from the environment once, in one frozen object.

The web tier, the worker, ``celeryconfig`` and the benchmarks all take a :class:`Settings`
(``current()`` builds it from ``os.environ`` on first use); tests build their own with
:meth:`Settings.from_env` or ``dataclasses.replace``.  Torch- and Flask-free.

Redis clients are made here too (:func:`connect`): they retry through a Redis/Valkey
restart with exponential back-off (redis-py's ``Retry``), for ``redis_retry_seconds``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from diffusers_helper.profiles import DEFAULT_PROFILE
from diffusers_helper.speed import AUTO, COMPILE_CHOICES, QUANT_CHOICES, SpeedOptions


def _num(env: Mapping[str, str], name: str, default: float, kind: type = float) -> Any:
    raw = env.get(name, "")
    try:
        return kind(raw) if raw.strip() else kind(default)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _webhook_allow(env: Mapping[str, str]) -> tuple[str, ...]:
    prefixes = _list(env, "FRAMEPACK_WEBHOOK_ALLOW")
    for prefix in prefixes:
        parts = urlsplit(prefix)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"FRAMEPACK_WEBHOOK_ALLOW: {prefix!r} is not an http(s) URL prefix")
    return prefixes


def _webhook_secret(env: Mapping[str, str], allow: tuple[str, ...]) -> str:
    """Standard Webhooks' ``whsec_<base64>``; required as soon as webhooks are allowed, so a
    misconfigured server says so at start instead of refusing every webhook later."""
    secret = env.get("FRAMEPACK_WEBHOOK_SECRET", "").strip()
    if not secret:
        if allow:
            raise ValueError("FRAMEPACK_WEBHOOK_ALLOW is set but FRAMEPACK_WEBHOOK_SECRET is not (whsec_<base64>)")
        return ""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        raise ValueError("FRAMEPACK_WEBHOOK_SECRET must be whsec_ followed by base64 of at least 16 random bytes")
    return secret


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (1/0, true/false, yes/no, on/off)")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or default).strip().lower()
    if raw not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def results_location(env: Mapping[str, str], default_dir: Path) -> tuple[str, Path]:
    """``RESULTS_URL`` (``s3://bucket/prefix``, ``file:///dir`` or a plain directory) or,
    without it, ``RESULTS_DIR``: ``("s3://bucket/prefix", RESULTS_DIR)`` for a bucket,
    ``("", directory)`` for a local directory (the one place a directory is named)."""
    raw = (env.get("RESULTS_URL") or "").strip()
    directory = Path(env.get("RESULTS_DIR") or default_dir).resolve()
    if not raw:
        return "", directory
    parts = urlsplit(raw)
    if parts.scheme == "s3":
        if len(parts.netloc) < 3 or "@" in parts.netloc:
            raise ValueError(f"RESULTS_URL={raw!r}: s3:// needs a bucket name (3 characters or more)")
        prefix = parts.path.strip("/")
        return (f"s3://{parts.netloc}/{prefix}" if prefix else f"s3://{parts.netloc}"), directory
    if parts.scheme == "file":
        return "", Path(parts.path).resolve()
    if parts.scheme:
        raise ValueError(f"RESULTS_URL={raw!r}: use s3://bucket/prefix, file:///dir or a directory")
    return "", Path(raw).resolve()


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs, ``/api/info`` and Celery's
    exported config)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class Settings:
    #: Redis: broker and result backend unless the two below say otherwise; job records.
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""
    result_backend: str = ""
    #: Where results live: ``""`` for the directory ``results_dir``, or ``s3://bucket/prefix``
    #: (``RESULTS_URL``; the bucket's endpoint and region below, credentials from boto3's
    #: usual chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, roles).
    results_url: str = ""
    results_dir: Path = Path("var/results")
    #: LoRA files (.safetensors) jobs may name; web tier and workers read the same directory.
    lora_dir: Path = Path("var/loras")
    #: Where a worker writes a job's files before uploading them (bucket results only).
    work_dir: Path = Path("var/work")
    s3_endpoint_url: str = ""
    s3_region: str = ""
    #: Bucket results: answer downloads with a 302 to a presigned URL valid this long,
    #: instead of streaming them through the web tier.
    results_redirect: bool = False
    presign_seconds: int = 300
    #: The worker's Prometheus endpoint (0: none); every worker on a host needs its own port.
    worker_metrics_port: int = 0
    worker_metrics_addr: str = "0.0.0.0"
    #: ``text`` (as before) or ``json``: one JSON object per line, the job id on each line about a job.
    log_format: str = "text"
    log_level: str = "INFO"
    profile: str = DEFAULT_PROFILE
    #: Let a worker's first load fetch missing weights from the Hugging Face hub (a 30 GB
    #: download inside a job otherwise never starts: the weights come from its cache).
    allow_download: bool = False
    #: The longest a job may run; time limits, visibility and consumer timeouts derive from it.
    max_job_seconds: int = 4 * 3600
    #: Finished jobs, their records and files live this long (Celery's result_expires).
    result_ttl: int = 7 * 24 * 3600
    #: Seconds between PROGRESS writes (stages, sections, the last step of a section and
    #: the end always go through).  10 Hz is plenty for eyes.
    progress_interval: float = 0.1
    #: A job whose worker died is delivered again at most this many times, then fails.
    max_redeliveries: int = 1
    #: Worker heartbeat period, and how long a heartbeat counts as alive (then: "stalled").
    heartbeat_seconds: float = 5.0
    heartbeat_ttl: int = 20
    #: A running job with no heartbeat for this long is failed as "worker lost".
    stall_fail_seconds: float = 600.0
    #: The background sweep (stalled jobs, revoked and purged messages, expiry) runs this often.
    sweep_seconds: float = 5.0
    #: How long a Redis call waits through an outage (back-off retries) before failing.
    redis_retry_seconds: float = 15.0
    #: How long a worker keeps retrying a job's final through an outage.
    final_retry_seconds: float = 600.0
    torch_threads: int = 0
    #: The worker's speed options (diffusers_helper.speed): ``auto`` is the fastest measured
    #: combination the device supports (CUDA: compiled blocks, FP8, cuDNN attention) and
    #: everything off on a CPU.  A worker that cannot honour an explicit one does not start.
    compile: str = AUTO
    quant: str = AUTO
    attention: str = AUTO
    #: MagCache ratios calibrated for other weights (``framepack calibrate``'s JSON,
    #: ``{"framepack": [...], "framepack-f1": [...]}``); empty: FramePack's published ratios.
    mag_ratios_file: str = ""
    #: The job worker's CPU priority (``nice``, 0-19).  On a host shared with the web tier a
    #: CPU-bound job would otherwise take half the cores from the fan-out to watchers and from
    #: requests whenever both want them (docs/benchmarks.md, scale); on a GPU the worker's
    #: CPU work is mostly launching kernels and barely notices.  0: not lowered.
    worker_nice: int = 10
    #: The original API's POST /cleanup_jobs keeps this many finished jobs.
    max_completed_jobs: int = 100
    max_upload_bytes: int = 32 * 2**20
    #: Uploads (requests with a body) one address, and one token, may have in flight per web
    #: process (429 beyond), and the slowest a body may arrive after a 10 s grace (408 below):
    #: slow bodies cost their client's time, not the web tier's (webapp/bodyguard.py).
    max_uploads_per_address: int = 16
    max_uploads_per_token: int = 4
    body_min_rate: int = 64 * 1024
    ws_send_buffer: int = 256 * 1024
    #: Open watcher streams (WebSocket and SSE) one web process serves; one more is refused at
    #: once (WebSocket close 1013, SSE 503 with Retry-After), never left waiting.  About 55 KB
    #: of memory each under the gevent server (docs/benchmarks.md).
    watcher_capacity: int = 4000
    #: API tokens: ``name:token[:role]`` entries, comma-separated, or ``@/path`` to a file
    #: with one per line (parsed by ``webapp.auth``).  Empty: the API is open.
    api_tokens: str = ""
    #: Lifetime of a signed access ticket (``?access=``: browsers' WebSocket, EventSource, <video>).
    access_ttl: int = 900
    #: Queued jobs one token may have (429 beyond); 0 = no limit.  Not applied without tokens.
    max_queued_per_token: int = 10
    #: Queued jobs in all (503 beyond); 0 = no limit.
    max_queue: int = 1000
    #: The longest video (seconds) and the most steps per section one job may ask for, per role.
    user_max_seconds: float = 120.0
    user_max_steps: int = 100
    admin_max_seconds: float = 120.0
    admin_max_steps: int = 100
    #: URL prefixes a job's webhook must start with; empty: webhooks are refused.
    webhook_allow: tuple[str, ...] = ()
    #: Standard Webhooks signing secret (``whsec_<base64>``).
    webhook_secret: str = ""
    #: First retry of a failed delivery after this many seconds, doubling (capped at an hour)...
    webhook_backoff: float = 5.0
    #: ...for at most this long after the event; then the delivery is given up.
    webhook_retry_seconds: float = 24 * 3600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
        redis_url = env.get("REDIS_URL") or d.redis_url
        allow = _webhook_allow(env)
        results_url, results_dir = results_location(env, d.results_dir)
        return cls(
            redis_url=redis_url,
            broker_url=env.get("CELERY_BROKER_URL") or redis_url,
            result_backend=env.get("CELERY_RESULT_BACKEND") or redis_url,
            lora_dir=Path(env.get("FRAMEPACK_LORA_DIR") or d.lora_dir).resolve(),
            results_url=results_url,
            results_dir=results_dir,
            work_dir=Path(env.get("FRAMEPACK_WORK_DIR") or d.work_dir).resolve(),
            s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "",
            s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "",
            results_redirect=_flag(env, "FRAMEPACK_RESULTS_REDIRECT", d.results_redirect),
            presign_seconds=_num(env, "FRAMEPACK_PRESIGN_SECONDS", d.presign_seconds, int),
            worker_metrics_port=_num(env, "FRAMEPACK_WORKER_METRICS_PORT", d.worker_metrics_port, int),
            worker_metrics_addr=env.get("FRAMEPACK_WORKER_METRICS_ADDR") or d.worker_metrics_addr,
            log_format=_choice(env, "LOG_FORMAT", d.log_format, ("text", "json")),
            log_level=(env.get("LOG_LEVEL") or d.log_level).upper(),
            profile=env.get("FRAMEPACK_PROFILE") or d.profile,
            allow_download=_flag(env, "FRAMEPACK_ALLOW_DOWNLOAD", d.allow_download),
            max_job_seconds=_num(env, "FRAMEPACK_MAX_JOB_SECONDS", d.max_job_seconds, int),
            result_ttl=_num(env, "FRAMEPACK_RESULT_EXPIRES", d.result_ttl, int),
            progress_interval=_num(env, "FRAMEPACK_PROGRESS_INTERVAL", d.progress_interval),
            max_redeliveries=_num(env, "FRAMEPACK_MAX_REDELIVERIES", d.max_redeliveries, int),
            heartbeat_seconds=_num(env, "FRAMEPACK_HEARTBEAT_SECONDS", d.heartbeat_seconds),
            heartbeat_ttl=_num(env, "FRAMEPACK_HEARTBEAT_TTL", d.heartbeat_ttl, int),
            stall_fail_seconds=_num(env, "FRAMEPACK_STALL_FAIL_SECONDS", d.stall_fail_seconds),
            sweep_seconds=_num(env, "FRAMEPACK_SWEEP_SECONDS", d.sweep_seconds),
            redis_retry_seconds=_num(env, "FRAMEPACK_REDIS_RETRY_SECONDS", d.redis_retry_seconds),
            final_retry_seconds=_num(env, "FRAMEPACK_FINAL_RETRY_SECONDS", d.final_retry_seconds),
            torch_threads=_num(env, "FRAMEPACK_TORCH_THREADS", d.torch_threads, int),
            compile=_choice(env, "FRAMEPACK_COMPILE", d.compile, (AUTO, *COMPILE_CHOICES)),
            quant=_choice(env, "FRAMEPACK_QUANT", d.quant, (AUTO, *QUANT_CHOICES)),
            attention=(env.get("FRAMEPACK_ATTENTION") or d.attention).strip().lower(),
            mag_ratios_file=env.get("FRAMEPACK_MAG_RATIOS", "").strip(),
            worker_nice=_num(env, "FRAMEPACK_WORKER_NICE", d.worker_nice, int),
            max_completed_jobs=_num(env, "FRAMEPACK_MAX_COMPLETED_JOBS", d.max_completed_jobs, int),
            max_upload_bytes=_num(env, "FRAMEPACK_MAX_UPLOAD_BYTES", d.max_upload_bytes, int),
            max_uploads_per_address=_num(env, "FRAMEPACK_MAX_UPLOADS_PER_ADDRESS", d.max_uploads_per_address, int),
            max_uploads_per_token=_num(env, "FRAMEPACK_MAX_UPLOADS_PER_TOKEN", d.max_uploads_per_token, int),
            body_min_rate=_num(env, "FRAMEPACK_BODY_MIN_RATE", d.body_min_rate, int),
            ws_send_buffer=_num(env, "FRAMEPACK_WS_SEND_BUFFER", d.ws_send_buffer, int),
            watcher_capacity=_num(env, "FRAMEPACK_WATCHER_CAPACITY", d.watcher_capacity, int),
            api_tokens=env.get("FRAMEPACK_API_TOKENS", "").strip(),
            access_ttl=_num(env, "FRAMEPACK_ACCESS_TTL", d.access_ttl, int),
            max_queued_per_token=_num(env, "FRAMEPACK_MAX_QUEUED_PER_TOKEN", d.max_queued_per_token, int),
            max_queue=_num(env, "FRAMEPACK_MAX_QUEUE", d.max_queue, int),
            user_max_seconds=_num(env, "FRAMEPACK_USER_MAX_SECONDS", d.user_max_seconds),
            user_max_steps=_num(env, "FRAMEPACK_USER_MAX_STEPS", d.user_max_steps, int),
            admin_max_seconds=_num(env, "FRAMEPACK_ADMIN_MAX_SECONDS", d.admin_max_seconds),
            admin_max_steps=_num(env, "FRAMEPACK_ADMIN_MAX_STEPS", d.admin_max_steps, int),
            webhook_allow=allow,
            webhook_secret=_webhook_secret(env, allow),
            webhook_backoff=_num(env, "FRAMEPACK_WEBHOOK_BACKOFF", d.webhook_backoff),
            webhook_retry_seconds=_num(env, "FRAMEPACK_WEBHOOK_RETRY_SECONDS", d.webhook_retry_seconds),
        )

    @property
    def store_url(self) -> str:
        """Redis holding job records: the result backend when it is Redis, else ``redis_url``."""
        backend = self.result_backend
        return backend if backend.startswith(("redis://", "rediss://", "unix://")) else self.redis_url

    @property
    def speed(self) -> SpeedOptions:
        return SpeedOptions(self.compile, self.quant, self.attention)

    def job_limits(self, role: str) -> tuple[float, int]:
        """(longest video in seconds, most steps) one job of ``role`` may ask for."""
        if role == "admin":
            return self.admin_max_seconds, self.admin_max_steps
        return self.user_max_seconds, self.user_max_steps

    def public(self) -> dict[str, Any]:
        """The settings as ``/api/info`` shows them: URLs without passwords, no secrets."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        for key in ("redis_url", "broker_url", "result_backend", "s3_endpoint_url"):
            out[key] = mask_url(out[key])
        tokens = self.api_tokens
        out["api_tokens"] = tokens if tokens.startswith("@") else "***" if tokens else ""
        out["webhook_secret"] = "***" if self.webhook_secret else ""
        out["webhook_allow"] = list(self.webhook_allow)
        return out


@functools.cache
def current() -> Settings:
    """The process's settings, from its environment (read once)."""
    return Settings.from_env()


def retry_policy(seconds: float) -> Retry:
    """Back-off 50 ms, 100 ms ... capped at 1 s, for about ``seconds`` in all."""
    attempts = 0
    total = 0.0
    while total < seconds:
        total += min(1.0, 0.05 * 2**attempts)
        attempts += 1
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), attempts)


def connect(url: str, retry_seconds: float, pool_size: int = 0, **kwargs: Any) -> redis.Redis:
    """A redis-py client that waits through a Redis restart for ``retry_seconds``
    (connection refused or reset, timeouts) instead of failing at once.  ``retry_seconds``
    0 fails fast (for calls that must never block a sampling step).

    ``pool_size``: at most that many connections, and a caller that finds them all busy
    waits for one (``BlockingConnectionPool``).  The web tier needs it: under gevent two
    thousand watchers connecting at once are two thousand concurrent callers, and redis-py's
    default pool would fail the ones past its limit with "Too many connections"."""
    kwargs.setdefault("socket_connect_timeout", 2.0)
    kwargs.setdefault("health_check_interval", 10)
    if retry_seconds > 0:
        kwargs["retry"] = retry_policy(retry_seconds)
        kwargs["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError]
    else:
        kwargs["retry"] = Retry(ExponentialBackoff(cap=0.1, base=0.01), 0)
        kwargs.setdefault("socket_timeout", 1.0)
    if pool_size:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=pool_size,
                                                     timeout=max(retry_seconds, 5.0), **kwargs)  # fmt: skip
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **kwargs)
