"""Prometheus metrics of the service (prometheus-client; torch- and Flask-free).

Two sources, chosen by what each number is about:

- **The cluster** (:class:`ClusterCollector`): jobs by state, jobs submitted and ended,
  the broker's queue depth, live workers.  Read from Redis at scrape time, so every web
  process of every web host gives the same, right answer, however many gunicorn
  processes serve ``/metrics`` and whichever one a scrape reaches.  Submissions and ends
  are counted in Redis by the lifecycle (``fp:stats``), not in a process.
- **One worker process** (:class:`WorkerMetrics`): seconds per sampling step, per
  section, per model load and per job, jobs it ended, uploads, Redis errors; served on
  the worker's own port (``FRAMEPACK_WORKER_METRICS_PORT``), one per worker.

The web tier's per-process numbers (watchers, preview latency, its Redis errors) are in
``webapp/metrics.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .protocol import REFUSALS, TERMINAL, Keys

log = logging.getLogger("framepack.metrics")

#: Seconds: a tiny CPU step is milliseconds, a real one on a GPU ~1-10 s, a job minutes to hours.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SECTION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
LOAD_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """One worker process's metrics, in their own registry (served on the worker's port)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram("framepack_step_seconds", "Wall time of one sampling step", buckets=STEP_BUCKETS,
                                      registry=r)  # fmt: skip
        self.section_seconds = Histogram("framepack_section_seconds", "Wall time of one section (sampling and "
                                         "writing its video)", buckets=SECTION_BUCKETS, registry=r)  # fmt: skip
        self.model_load_seconds = Histogram("framepack_model_load_seconds", "Loading the model profile",
                                            buckets=LOAD_BUCKETS, registry=r)  # fmt: skip
        self.job_seconds = Histogram("framepack_job_seconds", "Run time of a job on this worker, by how it ended",
                                     ["state"], buckets=JOB_BUCKETS, registry=r)  # fmt: skip
        self.jobs = Counter("framepack_worker_jobs", "Jobs this worker ran, by how they ended", ["state"], registry=r)
        self.busy = Gauge("framepack_worker_busy", "1 while a job runs", registry=r)
        self.ready = Gauge("framepack_worker_ready", "1 once the model is loaded", registry=r)
        self.speed = Info("framepack_worker_speed", "The speed options the transformer runs with (compile, quant, "
                          "attention)", registry=r)  # fmt: skip
        self.warm_up_seconds = Gauge("framepack_worker_warm_up_seconds", "Seconds the warm-up job took (compiling "
                                     "blocks) before the worker said ready", registry=r)  # fmt: skip
        self.redis_errors = Counter("framepack_redis_errors", "Redis calls that failed (outage, timeout)", ["where"],
                                    registry=r)  # fmt: skip
        self.upload_seconds = Histogram("framepack_results_upload_seconds", "Storing one result file",
                                        buckets=UPLOAD_BUCKETS, registry=r)  # fmt: skip
        self.upload_bytes = Counter("framepack_results_upload_bytes", "Bytes stored", registry=r)
        self.upload_errors = Counter("framepack_results_upload_errors", "Failed tries to store a result file",
                                     registry=r)  # fmt: skip
        for state in TERMINAL:  # every series exists from the start (rate() needs a zero)
            self.jobs.labels(state.value)
        for where in ("heartbeat", "update", "cancel_check"):
            self.redis_errors.labels(where)

    def timer(self) -> StepTimer:
        return StepTimer(self)


class StepTimer:
    """An event sink timing one job's steps and sections from ``generate()``'s events.

    A step is the time from the previous step's progress event (or the start of its
    section) to its own; a section, from the start of sampling or the previous section's
    video to its own video."""

    def __init__(self, metrics: WorkerMetrics):
        self.metrics = metrics
        self._last_step: float | None = None
        self._section_start: float | None = None

    def on_event(self, e: Any) -> None:
        from diffusers_helper import events as ev

        now = time.perf_counter()
        if isinstance(e, ev.Stage) and e.text == ev.STAGE_SAMPLING:
            self._section_start = self._last_step = now
        elif isinstance(e, ev.Progress):
            if self._last_step is not None:
                self.metrics.step_seconds.observe(now - self._last_step)
            self._last_step = now
        elif isinstance(e, ev.SectionDone):
            if self._section_start is not None:
                self.metrics.section_seconds.observe(now - self._section_start)
            self._section_start = self._last_step = now


def chain(*sinks: Callable[[Any], None]) -> Callable[[Any], None]:
    """One event sink calling each of ``sinks`` in order."""

    def on_event(e: Any) -> None:
        for sink in sinks:
            sink(e)

    return on_event


class ClusterCollector(Collector):
    """The whole service as Redis knows it, computed at each scrape.

    ``queue_depth()`` returns the broker's message count for the ``gpu`` queue (None when
    it cannot tell); ``workers()`` the live workers' heartbeat records."""

    def __init__(self, client: redis.Redis, queue_depth: Callable[[], int | None],
                 workers: Callable[[], list[dict[str, Any]]]):  # fmt: skip
        self.r = client
        self.queue_depth = queue_depth
        self.workers = workers

    def collect(self) -> Iterator[Any]:
        try:
            p = self.r.pipeline(transaction=False)
            p.zcard(Keys.QUEUED)
            p.zcard(Keys.RUNNING)
            p.hgetall(Keys.STATS)
            queued, running, stats = p.execute()
            workers = self.workers()
        except redis.RedisError as exc:  # the scrape still answers (per-process metrics), saying why
            log.warning("metrics: Redis unavailable: %s", exc)
            yield GaugeMetricFamily("framepack_redis_up", "1 when Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("framepack_redis_up", "1 when Redis answered this scrape", value=1)
        jobs = GaugeMetricFamily("framepack_jobs", "Jobs queued or running now", labels=["state"])
        jobs.add_metric(["queued"], queued)
        jobs.add_metric(["running"], running)
        yield jobs
        counts = {k.decode(): int(v) for k, v in stats.items()}
        yield CounterMetricFamily("framepack_jobs_submitted", "Jobs submitted and stored",
                                  value=counts.get(Keys.STATS_SUBMITTED, 0))  # fmt: skip
        refused = CounterMetricFamily("framepack_jobs_refused", "Submissions refused, by why: a queue limit "
                                      "(queue: everyone's, token: the caller's) or the input (invalid)",
                                      labels=["reason"])  # fmt: skip
        for reason in REFUSALS:
            refused.add_metric([reason], counts.get(Keys.stats_refused(reason), 0))
        yield refused
        ended = CounterMetricFamily("framepack_jobs_finished", "Jobs ended, by how", labels=["state"])
        for state in sorted(s.value for s in TERMINAL):
            ended.add_metric([state], counts.get(Keys.stats_finished(state), 0))
        yield ended
        try:
            depth = self.queue_depth()
        except Exception as exc:  # noqa: BLE001 — a broker hiccup costs this one number
            log.warning("metrics: broker queue depth unavailable: %s", exc)
            depth = None
        if depth is not None:
            yield GaugeMetricFamily("framepack_queue_depth", "Messages waiting in the broker's gpu queue", value=depth)
        yield GaugeMetricFamily("framepack_workers", "Live workers (heartbeat)", value=len(workers))
        yield GaugeMetricFamily("framepack_workers_ready", "Live workers with their model loaded",
                                value=sum(1 for w in workers if w.get("ready")))  # fmt: skip
        info = GaugeMetricFamily("framepack_worker_info", "One series per live worker: its Celery node, device "
                                 "and GPU", labels=["node", "name", "device", "gpu", "busy"])  # fmt: skip
        for w in workers:
            info.add_metric([str(w.get("node") or ""), str(w.get("name") or ""), str(w.get("device") or ""),
                             str(w.get("gpu") or ""), "1" if w.get("job") else "0"], 1)  # fmt: skip
        yield info
        speed = GaugeMetricFamily("framepack_worker_speed", "One series per live worker: the speed options its "
                                  "transformer runs with; 1 once warmed up, 0 while warming", labels=["name",
                                  "compile", "quant", "attention"])  # fmt: skip
        for w in workers:
            opts = w.get("speed") or {}
            speed.add_metric([str(w.get("name") or ""), *(str(opts.get(k) or "") for k in ("compile", "quant",
                              "attention"))], 0 if w.get("warming") or not w.get("ready") else 1)  # fmt: skip
        yield speed


def serve(registry: CollectorRegistry, port: int, addr: str) -> bool:
    """Serve ``registry`` on ``addr:port`` in a daemon thread; False (logged) when the port is taken."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.error("worker metrics: cannot listen on %s:%d (%s); give each worker its own "
                  "FRAMEPACK_WORKER_METRICS_PORT", addr, port, exc)  # fmt: skip
        return False
    log.info("worker metrics on http://%s:%d/metrics", addr, port)
    return True
