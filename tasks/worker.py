"""The ``tasks.generate_video`` task and the worker process's life (models, heartbeat).

A pool child loads its profile once, after the fork (CUDA cannot cross a fork), announces
in Redis which profile and device it serves, and keeps a heartbeat for itself and for the
job it runs.  The task asks :class:`tasks.lifecycle.Lifecycle` whether the job runs, turns
generation events into ``update_state`` calls (:class:`Reporter`, following
:mod:`tasks.protocol`) and ends the job through the lifecycle.  Celery stores nothing of
this task itself (``ignore_result``): every result document is the lifecycle's.

Results go to the results store (:mod:`tasks.results`): a local directory, or a bucket
the :class:`tasks.uploader.Uploader` fills as the files are written.  Each worker process
serves its own Prometheus metrics (:mod:`tasks.metrics`, ``FRAMEPACK_WORKER_METRICS_PORT``)
and, with ``LOG_FORMAT=json``, logs one JSON object per line (:mod:`tasks.logs`).

Redis outages: sampling never waits on Redis (:mod:`tasks.reporter` writes updates from
its own thread, latest progress wins), the cancel check treats an unreachable Redis as
"not cancelled", and the job's end is retried until Redis answers
(``FRAMEPACK_FINAL_RETRY_SECONDS``).

The same package runs the ``webhooks`` queue's worker (:mod:`tasks.webhooks`); a worker that
does not consume ``gpu`` loads no model and publishes no heartbeat.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_init,
    task_revoked,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)

from diffusers_helper.speed import AUTO, EAGER

from . import settings as settings_module
from . import webhooks
from .lifecycle import Lifecycle, holder_is_dead, worker_name
from .logs import configure as configure_logs
from .logs import job_context, use_json
from .metrics import WorkerMetrics, chain, serve
from .protocol import (
    CHECKPOINT_FILE,
    INPUT_FILE,
    QUEUE,
    TASK_NAME,
    TERMINAL,
    JobState,
    Keys,
    Reason,
    flower_event,
    result_text,
)
from .reporter import Reporter
from .results import ResultsStore, StoreUnavailable, open_store
from .uploader import Uploader

log = logging.getLogger("framepack.worker")


class WorkerState:
    """What one worker process holds: its models, the job it runs, its Redis clients.

    Created once per process; :meth:`after_fork` drops what must not cross a fork."""

    def __init__(self) -> None:
        self.settings = settings_module.current()
        self.lock = threading.Lock()  # held while the models load
        self.models: Any = None
        self.load_error: str | None = None
        #: True while the loaded models warm up (compiling blocks); the worker is not ready yet.
        self.warming = False
        #: The speed options the models run with and the warm-up's seconds (None before the load).
        self.speed: dict[str, Any] | None = None
        #: The CUDA device the models run on, as the driver names it (None on a CPU worker).
        self.gpu_name: str | None = None
        self.current_job: str | None = None
        self.pool = "prefork"
        self.node: str | None = None  # the Celery worker's hostname (what `celery inspect` names)
        self.runs_jobs = True  # False in a worker that consumes only other queues (webhooks)
        self._heartbeat: threading.Thread | None = None
        self._clients: dict[str, redis.Redis] = {}
        self._pid = os.getpid()
        self.store: ResultsStore = open_store(self.settings)  # its bucket client is made per process
        self.metrics = WorkerMetrics()
        self.metrics_served = False
        self.celeryd: Any = None  # the Celery worker (main process), once it starts

    def after_fork(self) -> None:
        self._clients = {}
        self._heartbeat = None
        self._pid = os.getpid()
        self.metrics_served = False

    def _client(self, name: str, retry_seconds: float) -> redis.Redis:
        if self._pid != os.getpid():  # a fork we were not told of: never share a connection
            self.after_fork()
        if name not in self._clients:
            self._clients[name] = settings_module.connect(self.settings.store_url, retry_seconds)
        return self._clients[name]

    @property
    def redis(self) -> redis.Redis:
        """Waits through a Redis restart (``redis_retry_seconds``)."""
        return self._client("store", self.settings.redis_retry_seconds)

    @property
    def quick(self) -> redis.Redis:
        """Fails at once: for calls made on the sampling path (the cancel check)."""
        return self._client("quick", 0)

    def lifecycle(self, task: Task | None = None) -> Lifecycle:
        def announce(job_id: str, event: str, fields: dict[str, Any]) -> None:
            if task is not None:
                task.send_event(event, **fields)

        dispatch = webhooks.dispatcher(task.app) if task is not None else None
        return Lifecycle(self.redis, self.settings, announce if task is not None else None, dispatch)

    def record(self) -> dict[str, Any]:
        models = self.models
        return {
            "name": worker_name(),
            "pid": os.getpid(),
            "node": self.node,
            "queues": [QUEUE],
            "ready": models is not None,
            "warming": self.warming,
            "speed": self.speed,
            "profile": models.profile.public_dict() if models else None,
            "device": models.placement.device if models else None,
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_name": self.gpu_name,
            "metrics_port": self.settings.worker_metrics_port if self.metrics_served else None,
            "loaded_variants": models.loaded_variants if models else [],
            "job": self.current_job,
            "error": self.load_error,
            "heartbeat": time.time(),
        }


STATE = WorkerState()


# -- worker life ------------------------------------------------------------------------
def load_models() -> Any:
    """Load the profile once per process; later calls return the same models.

    Every import of the generation code happens here, under the lock: a task that arrives
    while the background load runs waits for it instead of importing diffusers at the same
    time (diffusers' lazy modules are not safe to import from two threads at once)."""
    with STATE.lock:
        if STATE.models is not None:
            return STATE.models
        import torch

        import diffusers_helper.generate  # noqa: F401  (the task's imports, done once, here)
        from diffusers_helper.params import Variant
        from diffusers_helper.profiles import Models, resolve_profile

        if STATE.settings.torch_threads:
            torch.set_num_threads(STATE.settings.torch_threads)
        t = time.perf_counter()
        profile = resolve_profile(STATE.settings.profile)
        log.warning("framepack worker: profile %s — %s", profile.name, profile.description)
        models = Models(profile)
        if models.placement.device == "cuda":  # in the pool child: CUDA starts after the fork
            STATE.gpu_name = torch.cuda.get_device_name()
        models.mag_ratios = _mag_ratios(STATE.settings.mag_ratios_file)
        models.load_shared()
        models.transformer(Variant.FRAMEPACK)
        STATE.metrics.model_load_seconds.observe(time.perf_counter() - t)
        options = models.set_speed(STATE.settings.speed)
        STATE.speed = {**options.public_dict(), "warm_up_seconds": None}
        STATE.metrics.speed.info(options.public_dict())
        if options != EAGER:  # compiled or quantized: the first job must not pay for it
            _warm_up(models, Variant.FRAMEPACK)
        STATE.metrics.ready.set(1)
        STATE.models = models
        STATE.load_error = None
    _start_heartbeat()
    return models


def _warm_up(models: Any, variant: Any) -> None:
    """Run the warm-up job (diffusers_helper.generate.warm_up) before saying ready; the
    heartbeat says ``warming`` meanwhile and ``/readyz`` answers "warming up"."""
    import shutil
    import tempfile

    from diffusers_helper.generate import warm_up

    STATE.warming = True
    _start_heartbeat()
    directory = Path(tempfile.mkdtemp(prefix="framepack-warm-up-"))
    try:
        log.warning("framepack worker: warming up %s with %s", variant.value, models.speed.public_dict())
        seconds = warm_up(models, variant, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        STATE.warming = False
    STATE.speed = {**models.speed.public_dict(), "warm_up_seconds": round(seconds, 1)}
    STATE.metrics.warm_up_seconds.set(seconds)
    log.warning("framepack worker: warmed up in %.1f s", seconds)


def _mag_ratios(path: str) -> dict[str, list[float]]:
    """``FRAMEPACK_MAG_RATIOS``: per-variant MagCache ratios from ``framepack calibrate``."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    ratios = data.get("mag_ratios", data)
    if not isinstance(ratios, dict) or not all(isinstance(v, list) and v for v in ratios.values()):
        raise ValueError(f"FRAMEPACK_MAG_RATIOS={path}: expected {{variant: [ratio per step, ...]}}")
    return {str(k): [float(x) for x in v] for k, v in ratios.items()}


def check_speed_options(settings: Any) -> dict[str, Any] | None:
    """Explicit speed options are checked before the pool forks, in a fresh process (CUDA
    must not start in this one): a worker that cannot honour them stops with one line
    (``SystemExit``).  ``auto`` everywhere needs no check (it only picks what works)."""
    import subprocess
    import sys

    options = settings.speed
    if set(options.public_dict().values()) == {AUTO}:
        return None
    args = [f"{k}={v}" for k, v in options.public_dict().items()]
    done = subprocess.run([sys.executable, "-m", "diffusers_helper.speed", *args], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    if done.returncode != 0:
        line = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        log.critical("framepack worker cannot start: %s", line)
        raise SystemExit(f"framepack worker cannot start: {line}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def publish_heartbeat() -> None:
    p = STATE.redis.pipeline(transaction=False)
    p.set(Keys.worker(worker_name()), json.dumps(STATE.record()), ex=STATE.settings.heartbeat_ttl)
    p.zadd(Keys.WORKERS, {worker_name(): time.time()})
    if STATE.current_job:
        p.set(Keys.heartbeat(STATE.current_job), worker_name(), ex=STATE.settings.heartbeat_ttl)
    p.execute()


def forget_dead_siblings() -> list[str]:
    """Drop the records of this host's worker processes that no longer exist (a pool child
    killed and replaced), so ``/readyz`` and ``/api/info`` count live workers only."""
    r = STATE.redis
    dead = [name for name in (m.decode() for m in r.zrange(Keys.WORKERS, 0, -1)) if holder_is_dead(name)]
    if dead:
        p = r.pipeline(transaction=False)
        p.zrem(Keys.WORKERS, *dead)
        p.delete(*(Keys.worker(n) for n in dead))
        p.execute()
    return dead


def _start_heartbeat() -> None:
    if STATE._heartbeat is not None:
        return

    def beat() -> None:
        while True:
            try:
                publish_heartbeat()
            except redis.RedisError as exc:  # keep beating through a Redis outage
                STATE.metrics.redis_errors.labels("heartbeat").inc()
                log.warning("heartbeat failed: %s", exc)
            time.sleep(STATE.settings.heartbeat_seconds)

    STATE._heartbeat = threading.Thread(target=beat, name="framepack-heartbeat", daemon=True)
    STATE._heartbeat.start()


def _load_or_report() -> None:
    """Load at start; a failure (missing weights...) must not crash-loop the pool: it is
    published with the heartbeat (``/readyz`` shows it) and every job fails with it."""
    try:
        load_models()
    except Exception as exc:  # noqa: BLE001
        STATE.load_error = readable(exc)
        log.error("framepack worker cannot load its model: %s", STATE.load_error)
    _start_heartbeat()


def _serve_metrics() -> None:
    """The worker's Prometheus endpoint, in the process that runs the jobs."""
    port = STATE.settings.worker_metrics_port
    if port and not STATE.metrics_served:
        STATE.metrics_served = serve(STATE.metrics.registry, port, STATE.settings.worker_metrics_addr)


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:  # prefork child: load after the fork
    """Load in the background: the pool kills a child that has not said it is up within
    ``worker_proc_alive_timeout`` seconds, and real weights take minutes to load.  Until
    then the heartbeat says ``ready: false``; a task that arrives first waits for the load."""
    STATE.after_fork()
    if not STATE.runs_jobs:
        return
    _serve_metrics()
    try:
        forget_dead_siblings()
    except redis.RedisError as exc:
        log.warning("could not tidy dead workers' records: %s", exc)
    _start_heartbeat()
    threading.Thread(target=_load_or_report, name="framepack-loader", daemon=True).start()


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    STATE.pool = str(getattr(sender, "pool_cls", "")).lower()
    STATE.node = getattr(sender, "hostname", None)
    queues = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    consumed = getattr(queues, "consume_from", None)
    STATE.runs_jobs = consumed is None or QUEUE in consumed
    if STATE.runs_jobs:
        check_speed_options(STATE.settings)
    if STATE.runs_jobs and STATE.settings.worker_nice > 0:
        _lower_priority(min(19, STATE.settings.worker_nice))


def _lower_priority(nice: int) -> None:
    """``FRAMEPACK_WORKER_NICE``, before the pool starts: its processes and threads (torch's
    too) inherit it.  With autogroup scheduling (Linux's default for desktop and many server
    kernels) niceness orders processes only within a session, and each session gets an equal
    share of a contended core: a worker in a session of its own (``make run``, systemd) lowers
    its session's nice too, or the web tier would still wait for a core half of the time
    (measured: run delay = CPU time during a fan-out)."""
    nice = max(nice, os.getpriority(os.PRIO_PROCESS, 0))  # started lower still: stays so
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    autogroup = ""
    if os.getsid(0) == os.getpid():  # never lower a session we share with others
        try:
            with open("/proc/self/autogroup", "r+") as f:  # "/autogroup-123 nice 0"
                if int(f.read().split()[-1]) < nice:
                    f.seek(0)
                    f.write(str(nice))
            autogroup = " (and its session's autogroup)"
        except (OSError, ValueError, IndexError):
            pass  # no autogroup scheduling here
    log.info("job worker runs at nice %d%s (FRAMEPACK_WORKER_NICE)", nice, autogroup)


@worker_ready.connect
def _on_ready(**_: Any) -> None:  # solo/threads pools run tasks in this very process
    _quiet_term_handler()
    if "prefork" not in STATE.pool and STATE.runs_jobs:
        _serve_metrics()
        _load_or_report()


@celeryd_init.connect
def _on_celeryd_init(instance: Any = None, **_: Any) -> None:
    """``LOG_FORMAT=json`` from the first line: no banner ("celery@host ready." is logged
    instead), warnings (Celery's "running as root") as log records, JSON until Celery sets
    up its own handlers (which :func:`_on_setup_logger` turns JSON too)."""
    if STATE.settings.log_format != "json":
        return
    if instance is not None:
        instance.quiet = True
        STATE.celeryd = instance
    logging.captureWarnings(True)
    configure_logs("json", STATE.settings.log_level)


def _quiet_term_handler() -> None:
    """Celery's SIGTERM handler writes "worker: Warm shutdown (MainProcess)" straight to the
    terminal; in JSON mode it is installed again without that line, and
    :func:`_on_shutting_down` logs it as JSON."""
    from celery.apps import worker as celery_worker

    if STATE.settings.log_format == "json" and STATE.celeryd is not None:
        celery_worker.install_worker_term_handler(STATE.celeryd, verbose=False)


@worker_shutting_down.connect
def _on_shutting_down(sig: Any = None, how: str = "", **_: Any) -> None:
    if STATE.settings.log_format == "json":
        log.warning("worker: %s shutdown (%s)", how, sig)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _on_setup_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    """``LOG_FORMAT=json``: Celery's handlers (and what it redirects from stdout) write JSON."""
    if STATE.settings.log_format == "json" and logger is not None:
        use_json([logger])


@task_revoked.connect
def _on_revoked(request: Any = None, terminated: bool = False, signum: Any = None, expired: bool = False,
                **_: Any) -> None:  # fmt: skip
    """``celery control revoke`` / ``terminate`` (and Flower's buttons): Celery has already
    announced REVOKED to Flower; the lifecycle ends the job in our records with the reason,
    gives every watcher its final and puts the reason in Flower's Result column.  Runs in
    the worker's main process."""
    job_id = getattr(request, "id", None)
    if not job_id:
        return
    if terminated:
        reason = Reason.TERMINATED.format(signum=signum)
    elif expired:
        reason = Reason.EXPIRED
    else:
        reason = Reason.REVOKED
    from celery import current_app

    def announce(job_id: str, event: str, fields: dict[str, Any]) -> None:  # the Result column's text
        with current_app.events.default_dispatcher(hostname=getattr(request, "hostname", None)) as dispatcher:
            dispatcher.send(event, uuid=job_id, **fields)

    lc = Lifecycle(STATE.redis, STATE.settings, announce, webhooks.dispatcher(current_app))
    lc.request_cancel(job_id)  # a redelivered copy never runs
    lc.finish_patiently(job_id, JobState.CANCELLED, reason=reason)


def _open_image(data: bytes | None, what: str) -> Any:
    from PIL import Image

    if data is None:
        raise ValueError(f"{what} is missing (expired or never stored)")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def readable(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return "GPU out of memory: try a shorter video, a smaller resolution or more gpu_memory_preservation"
    if isinstance(exc, SoftTimeLimitExceeded):
        return "time limit exceeded"
    return f"{name}: {exc}" if str(exc) else name


def _cancel_check(job_id: str) -> Any:
    """The per-step cancel check: an unreachable Redis means "not cancelled" (the job goes
    on through an outage; a cancel sent meanwhile is seen once Redis is back)."""

    def cancelled() -> bool:
        try:
            return bool(STATE.quick.exists(Keys.cancel(job_id)))
        except redis.RedisError:
            STATE.metrics.redis_errors.labels("cancel_check").inc()
            return False

    return cancelled


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate_video(self: Task, job_id: str, params: dict[str, Any]) -> str | None:
    """Run one job.  Returns the short summary Flower shows; the full final meta is the
    lifecycle's result document."""
    with job_context(job_id):
        return _deliver(self, job_id, params)


def _deliver(self: Task, job_id: str, params: dict[str, Any]) -> str | None:
    lc = STATE.lifecycle(self)
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
    last_seq = max(record.get("seq", 0), int(previous.get("seq") or 0))
    reporter = Reporter(self, job_id, lc, record.get("started_at") or time.time(), last_seq,
                        attempts=start.attempts, hostname=self.request.hostname,
                        progress_interval=STATE.settings.progress_interval, record=record,
                        sections_done=previous.get("sections_done") or [],
                        on_drop=STATE.metrics.redis_errors.labels("update").inc)  # fmt: skip
    uploader = Uploader(STATE.store, job_id, reporter.on_event, STATE.metrics)
    STATE.current_job = job_id
    STATE.metrics.busy.set(1)
    began = time.monotonic()
    outcome = JobState.FAILED
    log.info("job %s runs on %s (delivery %d)", job_id, worker_name(), start.attempts)
    try:
        outcome, text = _run(reporter, uploader, lc, job_id, params, record.get("extends"))
    finally:
        reporter.close()
        uploader.release()
        STATE.current_job = None
        STATE.metrics.busy.set(0)
        STATE.metrics.jobs.labels(outcome.value).inc()
        STATE.metrics.job_seconds.labels(outcome.value).observe(time.monotonic() - began)
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
            STATE.store.local_copy(job_id, CHECKPOINT_FILE, output.checkpoint)
        extend_from = None
        if extends:  # the job it continues: that job's last checkpoint (a download from a bucket)
            extend_from = STATE.store.local_copy(extends, CHECKPOINT_FILE, out_dir / f".extends-{CHECKPOINT_FILE}")
            if extend_from is None:
                raise ValueError(f"extend: job {extends} has no section checkpoint any more (expired or deleted)")
        result = generate(
            job, image, chain(STATE.metrics.timer().on_event, uploader.on_event), _cancel_check(job_id),
            models=models, output=output, end_image=end_image, lora_dir=STATE.settings.lora_dir,
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
        "cache": {"mode": result.cache_mode, "threshold": result.cache_threshold,
                  "transformer_calls": result.transformer_calls, "skipped": result.cache_skipped_steps},
        "speed": result.speed,
        "profile": models.profile.name,
        "loras": result.loras,
        "resumed_from_section": result.resumed_from_section,
        "extends": extends,
        "extended_sections": result.extended_sections,
    }
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
