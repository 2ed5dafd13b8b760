"""Web tier over 1,000 dispatched jobs: memory and Redis subscriptions must stay flat.

    python -m bench.bench_leak [--smoke] [--json OUT.json]

Why: with a result backend configured, Celery's Redis backend subscribes the *dispatching*
process to ``celery-task-meta-<id>`` for every task it sends and never unsubscribes
(celery #6963), so a web tier that dispatches with it grows one subscription, and some
memory, per job, forever.  Ours dispatches with a backend-less client
(:mod:`tasks.celery_app`), and this benchmark holds it to that.

No worker runs: jobs stay queued, which is fine because the leak under test is on the
sending side.  After a few warm-up submissions (imports, connection pools, first-request
caches), it samples the gunicorn worker's RSS and the pub/sub subscriptions its own Redis
connections hold (``CLIENT LIST`` ``sub``/``psub``/``ssub`` of the connections whose
client port belongs to that process), plus server-wide ``PUBSUB NUMPAT`` and the
``celery-task-meta-*`` channels with a subscriber, after 10 %, 50 % and 100 % of the jobs.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import psutil

from bench.bench_overhead import noise_png
from bench.harness import BenchStack, bench_main, machine_facts, rss_mb

FORM = {"total_second_length": "1", "steps": "4"}
CHECKPOINTS = (0.1, 0.5, 1.0)


def web_subscriptions(stack: BenchStack, pid: int) -> dict[str, int]:
    """Connections the web process holds to Redis, and the subscriptions on them."""
    r = stack.redis()
    try:
        redis_port = r.connection_pool.connection_kwargs["port"]
        ports = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
                 if c.raddr and c.raddr.port == redis_port}  # fmt: skip
        mine = [c for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]
        subs = sum(int(c.get(k, 0)) for c in mine for k in ("sub", "psub", "ssub"))
        return {
            "connections": len(mine),
            "subscribed_connections": sum(1 for c in mine if int(c.get("sub", 0)) or int(c.get("psub", 0))),
            "subscriptions": subs,
            "numpat": int(r.pubsub_numpat()),
            "meta_channels": len(r.pubsub_channels("celery-task-meta-*")),
        }
    finally:
        r.close()


def sample(stack: BenchStack, pid: int, jobs: int, elapsed: float) -> dict[str, Any]:
    return {"jobs": jobs, "submit_s": round(elapsed, 3), "rss_mb": round(rss_mb(pid), 2),
            **web_subscriptions(stack, pid)}  # fmt: skip


def run(smoke: bool = False, jobs: int | None = None, warmup: int | None = None) -> dict[str, Any]:
    jobs = jobs or (20 if smoke else 1000)
    warmup = warmup or (3 if smoke else 20)
    marks = sorted({max(1, round(jobs * f)) for f in CHECKPOINTS})
    png = noise_png(64, 64)
    statuses: dict[int, int] = {}
    samples: list[dict[str, Any]] = []
    with BenchStack(worker=False) as stack, httpx.Client(base_url=stack.base, timeout=30, trust_env=False) as client:
        pid = stack.web_pid()

        def submit() -> None:
            r = client.post("/api/jobs", files={"image": ("in.png", png, "image/png")}, data=FORM)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        for _ in range(warmup):
            submit()
        warm_statuses, statuses = statuses, {}
        samples.append(sample(stack, pid, 0, 0.0))
        done, busy = 0, 0.0
        for mark in marks:
            t = time.perf_counter()
            while done < mark:
                submit()
                done += 1
            busy += time.perf_counter() - t  # sampling time is not submission time
            samples.append(sample(stack, pid, done, busy))
        queued = stack.redis().llen("gpu")
    first, last = samples[0], samples[-1]
    growth = last["rss_mb"] - first["rss_mb"]
    return {
        "benchmark": "leak",
        "smoke": smoke,
        "jobs_requested": jobs,
        "jobs_submitted": sum(statuses.values()),
        "statuses": {str(k): v for k, v in statuses.items()},
        "warmup": warmup,
        "warmup_statuses": {str(k): v for k, v in warm_statuses.items()},
        "queued_in_broker": queued,
        "machine": machine_facts(),
        "samples": samples,
        "submissions_per_s": round(jobs / busy, 1) if busy else None,
        "rss_growth_mb": round(growth, 2),
        "rss_growth_mb_per_1000": round(growth / jobs * 1000, 2),
        "rss_growth_second_half_mb": round(last["rss_mb"] - samples[-2]["rss_mb"], 2),  # still climbing?
        "max_web_subscriptions": max(s["subscriptions"] for s in samples),
        "target": "subscriptions 0 → 0; RSS growth small",
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| jobs dispatched | web RSS MB | web Redis conns | subscriptions held by web | NUMPAT "
        "| `celery-task-meta-*` channels | submit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["samples"]:
        rows.append(f"| {s['jobs']} | {s['rss_mb']:.1f} | {s['connections']} | **{s['subscriptions']}** "
                    f"| {s['numpat']} | {s['meta_channels']} | {s['submit_s']:.1f} |")  # fmt: skip
    first, last = result["samples"][0], result["samples"][-1]
    flat = result["max_web_subscriptions"] == 0
    samples_half = result["samples"][-2]["jobs"]
    reading = (
        f"{result['jobs_submitted']} jobs were dispatched through `POST /api/jobs` (statuses "
        f"{result['statuses']}; no worker, so {result['queued_in_broker']} sit in the broker queue) at "
        f"{result['submissions_per_s']} submissions/s from one client. The web process held "
        f"{first['subscriptions']} → {last['subscriptions']} pub/sub subscriptions on "
        f"{first['connections']} → {last['connections']} Redis connections "
        f"({'flat: the backend-less dispatch client subscribes to nothing' if flat else 'NOT flat: a leak'}), "
        f"where a dispatcher with Celery's Redis result backend holds one per job (celery #6963). Its RSS went "
        f"{first['rss_mb']:.1f} → {last['rss_mb']:.1f} MB after {result['warmup']} warm-up jobs: "
        f"{result['rss_growth_mb']:+.1f} MB, {result['rss_growth_mb_per_1000']:+.1f} MB per 1,000 jobs "
        f"({result['rss_growth_second_half_mb']:+.1f} MB over the second half, {samples_half} → "
        f"{result['jobs_submitted']} jobs). Target: {result['target']}. "
        f"Command: `python -m bench.bench_leak{' --smoke' if result['smoke'] else ''}`."
    )
    return "### Web tier over many dispatched jobs (leak check)\n\n" + "\n".join(rows) + "\n\n" + reading + "\n"


def main() -> None:
    bench_main(run, markdown, __doc__, "20 jobs instead of 1,000")


if __name__ == "__main__":
    main()
