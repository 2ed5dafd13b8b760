"""``GET /metrics``: Prometheus text for the web tier, right under any number of gunicorn processes.

What the service as a whole is doing (jobs by state, submitted and ended, queue depth,
workers) is read from Redis at scrape time (:class:`tasks.metrics.ClusterCollector`): every
process answers the same.  What only a process knows (its watchers, the latency of the
previews it fans out, its Redis errors) uses prometheus-client's multiprocess mode when
``PROMETHEUS_MULTIPROC_DIR`` is set — ``gunicorn_conf.py`` sets it up for gunicorn,
wiping it at start and dropping dead workers' live gauges — so a scrape that reaches one
process reports the sum over all of them.  Without it (one process, tests) the process's
own registry is served.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

bp = Blueprint("metrics", __name__)

#: Seconds from a worker's update to this process handing it to its watchers.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Seconds the hub spends on one update for all watchers (direct writes and wake-ups).
FANOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
#: Seconds of one full garbage collection (~120 objects per watcher to walk).
GC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class WebMetrics:
    """One web process's own metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.watchers = Gauge("framepack_watchers", "Open WebSocket and SSE streams (a job's or the all-jobs feed)",
                              multiprocess_mode="livesum", registry=r)  # fmt: skip
        self.preview_latency = Histogram("framepack_preview_latency_seconds", "From the worker writing an update "
                                         "with a preview to the web tier handing it to that job's watchers",
                                         buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.capacity = Gauge("framepack_watcher_capacity", "Watcher streams the web processes accept at most "
                              "(FRAMEPACK_WATCHER_CAPACITY each)", multiprocess_mode="livesum", registry=r)  # fmt: skip
        self.refused = Counter("framepack_watchers_refused", "Watcher streams refused at capacity (WebSocket 1013, "
                               "SSE 503)", registry=r)  # fmt: skip
        self.fanout = Histogram("framepack_web_fanout_seconds", "Time the hub takes to hand one update (or the "
                                "several that arrived together) to all of its job's watchers in this process",
                                buckets=FANOUT_BUCKETS, registry=r)  # fmt: skip
        self.fanout_cpu = Counter("framepack_web_fanout_cpu_seconds", "CPU time of the hub's fan-outs (its thread's; "
                                  "against framepack_web_fanout_seconds: the rest is waiting for a core)",
                                  registry=r)  # fmt: skip
        self.gc = Histogram("framepack_web_gc_seconds", "Full garbage collections of this process, run between "
                            "fan-outs (webapp.gcpolicy): none of its watchers is served during one",
                            buckets=GC_BUCKETS, registry=r)  # fmt: skip
        self.redis_errors = Counter("framepack_redis_errors", "Redis calls that failed (outage, timeout)", ["where"],
                                    registry=r)  # fmt: skip
        for where in ("request", "hub", "sweep"):
            self.redis_errors.labels(where)
        self.cluster: Any = None  # tasks.metrics.ClusterCollector, set by the service

    def exposition(self) -> bytes:
        scrape = CollectorRegistry(auto_describe=False)
        if multiprocess():
            from prometheus_client import multiprocess as mp

            mp.MultiProcessCollector(scrape)
        else:
            scrape.register(self.registry)
        if self.cluster is not None:
            scrape.register(self.cluster)
        return generate_latest(scrape)


@bp.get("/metrics")
def metrics() -> Response:
    body = current_app.extensions["framepack"].metrics.exposition()
    return Response(body, content_type=CONTENT_TYPE_LATEST)
