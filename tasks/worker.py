"""The worker process: its models, heartbeat, metrics, logs and Celery's signals.

A pool child loads its profile once, after the fork (CUDA cannot cross a fork), announces
in Redis which profile and device it serves (the heartbeat, ``fp:worker:<name>``), and
keeps a heartbeat for the job it runs.  Explicit speed options are checked before the pool
forks, in a subprocess; compiled models are warmed up before the worker says ready.  Each
worker process serves its own Prometheus metrics (:mod:`tasks.metrics`,
``FRAMEPACK_WORKER_METRICS_PORT``) and, with ``LOG_FORMAT=json``, logs one JSON object per
line (:mod:`tasks.logs`).  The job itself runs in :mod:`tasks.job`.

The state (:func:`state`) is built on first use, when the worker starts: importing this
module reads no environment.  The same package runs the ``webhooks`` queue's worker
(:mod:`tasks.webhooks`); a worker that does not consume ``gpu`` loads no model and
publishes no heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
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
from .logs import use_json
from .metrics import WorkerMetrics, serve
from .protocol import (
    QUEUE,
    JobState,
    Keys,
    Reason,
)
from .results import ResultsStore, open_store

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


_state: WorkerState | None = None


def state() -> WorkerState:
    """This worker process's state, built on first use (when the worker starts: Celery's
    first signal), never at import: importing this module reads no environment."""
    global _state
    if _state is None:
        _state = WorkerState()
    return _state


# -- worker life ------------------------------------------------------------------------
def load_models() -> Any:
    """Load the profile once per process; later calls return the same models.

    Every import of the generation code happens here, under the lock: a task that arrives
    while the background load runs waits for it instead of importing diffusers at the same
    time (diffusers' lazy modules are not safe to import from two threads at once)."""
    with state().lock:
        if state().models is not None:
            return state().models
        import torch

        import diffusers_helper.generate  # noqa: F401  (the task's imports, done once, here)
        from diffusers_helper.params import Variant
        from diffusers_helper.profiles import Models, resolve_profile

        if state().settings.torch_threads:
            torch.set_num_threads(state().settings.torch_threads)
        t = time.perf_counter()
        profile = resolve_profile(state().settings.profile)
        log.warning("framepack worker: profile %s — %s", profile.name, profile.description)
        models = Models(profile, allow_download=state().settings.allow_download)
        if models.placement.device == "cuda":  # in the pool child: CUDA starts after the fork
            state().gpu_name = torch.cuda.get_device_name()
        models.mag_ratios = _mag_ratios(state().settings.mag_ratios_file)
        models.load_shared()
        models.transformer(Variant.FRAMEPACK)
        state().metrics.model_load_seconds.observe(time.perf_counter() - t)
        options = models.set_speed(state().settings.speed)
        state().speed = {**options.public_dict(), "warm_up_seconds": None}
        state().metrics.speed.info(options.public_dict())
        if options != EAGER:  # compiled or quantized: the first job must not pay for it
            _warm_up(models, Variant.FRAMEPACK)
        state().metrics.ready.set(1)
        state().models = models
        state().load_error = None
    _start_heartbeat()
    return models


def _warm_up(models: Any, variant: Any) -> None:
    """Run the warm-up job (diffusers_helper.generate.warm_up) before saying ready; the
    heartbeat says ``warming`` meanwhile and ``/readyz`` answers "warming up"."""
    import shutil
    import tempfile

    from diffusers_helper.generate import warm_up

    state().warming = True
    _start_heartbeat()
    directory = Path(tempfile.mkdtemp(prefix="framepack-warm-up-"))
    try:
        log.warning("framepack worker: warming up %s with %s", variant.value, models.speed.public_dict())
        seconds = warm_up(models, variant, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        state().warming = False
    state().speed = {**models.speed.public_dict(), "warm_up_seconds": round(seconds, 1)}
    state().metrics.warm_up_seconds.set(seconds)
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
    p = state().redis.pipeline(transaction=False)
    p.set(Keys.worker(worker_name()), json.dumps(state().record()), ex=state().settings.heartbeat_ttl)
    p.zadd(Keys.WORKERS, {worker_name(): time.time()})
    if state().current_job:
        p.set(Keys.heartbeat(state().current_job), worker_name(), ex=state().settings.heartbeat_ttl)
    p.execute()


def forget_dead_siblings() -> list[str]:
    """Drop the records of this host's worker processes that no longer exist (a pool child
    killed and replaced), so ``/readyz`` and ``/api/info`` count live workers only."""
    r = state().redis
    dead = [name for name in (m.decode() for m in r.zrange(Keys.WORKERS, 0, -1)) if holder_is_dead(name)]
    if dead:
        p = r.pipeline(transaction=False)
        p.zrem(Keys.WORKERS, *dead)
        p.delete(*(Keys.worker(n) for n in dead))
        p.execute()
    return dead


def _start_heartbeat() -> None:
    if state()._heartbeat is not None:
        return

    def beat() -> None:
        while True:
            try:
                publish_heartbeat()
            except redis.RedisError as exc:  # keep beating through a Redis outage
                state().metrics.redis_errors.labels("heartbeat").inc()
                log.warning("heartbeat failed: %s", exc)
            time.sleep(state().settings.heartbeat_seconds)

    state()._heartbeat = threading.Thread(target=beat, name="framepack-heartbeat", daemon=True)
    state()._heartbeat.start()


def _load_or_report() -> None:
    """Load at start; a failure (missing weights...) must not crash-loop the pool: it is
    published with the heartbeat (``/readyz`` shows it) and every job fails with it."""
    try:
        load_models()
    except Exception as exc:  # noqa: BLE001
        state().load_error = readable(exc)
        log.error("framepack worker cannot load its model: %s", state().load_error)
    _start_heartbeat()


def _serve_metrics() -> None:
    """The worker's Prometheus endpoint, in the process that runs the jobs."""
    port = state().settings.worker_metrics_port
    if port and not state().metrics_served:
        state().metrics_served = serve(state().metrics.registry, port, state().settings.worker_metrics_addr)


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:  # prefork child: load after the fork
    """Load in the background: the pool kills a child that has not said it is up within
    ``worker_proc_alive_timeout`` seconds, and real weights take minutes to load.  Until
    then the heartbeat says ``ready: false``; a task that arrives first waits for the load."""
    state().after_fork()
    if not state().runs_jobs:
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
    state().pool = str(getattr(sender, "pool_cls", "")).lower()
    state().node = getattr(sender, "hostname", None)
    queues = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    consumed = getattr(queues, "consume_from", None)
    state().runs_jobs = consumed is None or QUEUE in consumed
    if state().runs_jobs:
        check_speed_options(state().settings)
    if state().runs_jobs and state().settings.worker_nice > 0:
        _lower_priority(min(19, state().settings.worker_nice))


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
    if "prefork" not in state().pool and state().runs_jobs:
        _serve_metrics()
        _load_or_report()


@celeryd_init.connect
def _on_celeryd_init(instance: Any = None, **_: Any) -> None:
    """``LOG_FORMAT=json`` from the first line: no banner ("celery@host ready." is logged
    instead), warnings (Celery's "running as root") as log records, JSON until Celery sets
    up its own handlers (which :func:`_on_setup_logger` turns JSON too)."""
    if state().settings.log_format != "json":
        return
    if instance is not None:
        instance.quiet = True
        state().celeryd = instance
    logging.captureWarnings(True)
    configure_logs("json", state().settings.log_level)


def _quiet_term_handler() -> None:
    """Celery's SIGTERM handler writes "worker: Warm shutdown (MainProcess)" straight to the
    terminal; in JSON mode it is installed again without that line, and
    :func:`_on_shutting_down` logs it as JSON."""
    from celery.apps import worker as celery_worker

    if state().settings.log_format == "json" and state().celeryd is not None:
        celery_worker.install_worker_term_handler(state().celeryd, verbose=False)


@worker_shutting_down.connect
def _on_shutting_down(sig: Any = None, how: str = "", **_: Any) -> None:
    if state().settings.log_format == "json":
        log.warning("worker: %s shutdown (%s)", how, sig)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _on_setup_logger(logger: logging.Logger | None = None, **_: Any) -> None:
    """``LOG_FORMAT=json``: Celery's handlers (and what it redirects from stdout) write JSON."""
    if state().settings.log_format == "json" and logger is not None:
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

    lc = Lifecycle(state().redis, state().settings, announce, webhooks.dispatcher(current_app))
    lc.request_cancel(job_id)  # a redelivered copy never runs
    lc.finish_patiently(job_id, JobState.CANCELLED, reason=reason)


def readable(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return "GPU out of memory: try a shorter video, a smaller resolution or more gpu_memory_preservation"
    if isinstance(exc, SoftTimeLimitExceeded):
        return "time limit exceeded"
    return f"{name}: {exc}" if str(exc) else name
