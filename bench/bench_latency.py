"""Preview latency, delivery and Redis work: our fan-out vs clients polling the result.

    python -m bench.bench_latency [--watchers 1,50,500] [--updates 40] [--rate 2] [--json OUT]

A *publisher* in this process plays the worker: the real ``Reporter`` (the code the Celery
task runs) turns generation events into ``update_state`` writes through Celery's real Redis
result backend, with real 640-bucket preview JPEGs (~30 KB of base64), at ``rate`` updates a
second.  Each meta carries the worker's emit time, so latency = client receive time − emit
time, on one clock.  *Watchers* run in a separate process (asyncio):

- ``ws``: our WebSocket stream (``/ws/jobs/<id>``) through the gunicorn web tier;
- ``poll-1s`` / ``poll-100ms``: each client polls the task's result itself at that period,
  as an ``AsyncResult`` loop would (one GET of ``celery-task-meta-<id>`` per poll), and sees
  only the updates that are current when it looks.

Redis commands per update come from ``INFO commandstats`` deltas over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import re
import time
from typing import Any

import httpx
import torch

from .harness import BenchStack, command_delta, commandstats, percentiles

SEQ = re.compile(rb'"seq":\s*(\d+)')
EMITTED = re.compile(rb'"emitted_at":\s*([0-9.]+)')


# -- watchers (child process) ---------------------------------------------------------------
async def _ws_watcher(url: str, out: list, ready: asyncio.Event, count: list, finals: list,
                      all_final: asyncio.Event) -> None:  # fmt: skip
    import websockets

    async with websockets.connect(url, max_size=None, compression=None, open_timeout=60, ping_interval=None) as ws:
        count[0] += 1
        if count[0] == count[1]:
            ready.set()
        async for raw in ws:
            now = time.time()
            head = (raw if isinstance(raw, bytes) else raw.encode())[:400]
            if head.startswith(b'{"type":"snapshot"'):
                continue
            seq, emitted = SEQ.search(head), EMITTED.search(head)
            if seq and emitted:
                out.append((int(seq.group(1)), float(emitted.group(1)), now))
            if head.startswith(b'{"type":"final"'):
                break
        # closing 500 connections would delay this process reading the other finals: wait
        finals[0] += 1
        if finals[0] == count[1]:
            all_final.set()
        await all_final.wait()


async def _poll_watcher(redis_url: str, key: str, period: float, out: list, stop: asyncio.Event) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    last = -1
    await asyncio.sleep(random.random() * period)  # clients are not in phase
    try:
        while not stop.is_set():
            raw = await r.get(key)
            now = time.time()
            if raw:
                seq, emitted = SEQ.search(raw), EMITTED.search(raw)
                if seq and int(seq.group(1)) != last:
                    last = int(seq.group(1))
                    out.append((last, float(emitted.group(1)), now))
                if b'"state": "succeeded"' in raw or b'"state":"succeeded"' in raw:
                    return
            await asyncio.sleep(period)
    finally:
        await r.aclose()


def _watch_process(mode: str, n: int, url: str, redis_url: str, key: str, conn: Any) -> None:
    import gc

    gc.disable()  # the measuring client must not add its own collector pauses to the numbers
    async def main() -> list:
        results: list[list] = [[] for _ in range(n)]
        if mode == "ws":
            ready, count, finals, all_final = asyncio.Event(), [0, n], [0], asyncio.Event()
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(_ws_watcher(url, results[i], ready, count, finals, all_final)))
                if i % 50 == 49:
                    await asyncio.sleep(0.05)  # don't SYN-flood the listen backlog
            await asyncio.wait_for(ready.wait(), 120)
            conn.send("ready")
            await asyncio.wait_for(asyncio.gather(*tasks), 600)
        else:
            stop = asyncio.Event()
            period = 1.0 if mode == "poll-1s" else 0.1
            tasks = [asyncio.create_task(_poll_watcher(redis_url, key, period, results[i], stop)) for i in range(n)]
            await asyncio.sleep(0.2)
            conn.send("ready")
            await asyncio.wait_for(asyncio.gather(*tasks), 600)
        return results

    conn.send(asyncio.run(main()))


# -- the publisher (this process) -------------------------------------------------------------
class _Task:
    """What ``Reporter`` needs of a Celery task: ``update_state`` through the real backend."""

    def __init__(self, app: Any, job_id: str):
        self.app, self.job_id = app, job_id

    def update_state(self, task_id: str, state: str, meta: dict) -> None:
        self.app.backend.store_result(task_id, meta, state)

    def send_event(self, *_: Any, **__: Any) -> None:
        pass


def _publish(stack: BenchStack, job_id: str, updates: int, rate: float) -> list[float]:
    """Play a worker: ``updates`` progress updates, each with a fresh 640-bucket preview."""
    from diffusers_helper import events as ev
    from diffusers_helper.preview import LatentToRGB, make_preview
    from tasks.celery_app import make_celery
    from tasks.lifecycle import Lifecycle
    from tasks.reporter import Reporter
    from tasks.settings import Settings

    app = make_celery()
    app.conf.update(result_backend=stack.redis_url, broker_url=stack.redis_url)
    lifecycle = Lifecycle(stack.redis(), Settings(redis_url=stack.redis_url))
    reporter = Reporter(_Task(app, job_id), job_id, lifecycle, time.time(), progress_interval=0)
    mapper = LatentToRGB(16)
    latents = [torch.randn(1, 16, 9, 80, 76) for _ in range(4)]
    cost = []
    steps = updates
    for i in range(updates):
        t0 = time.perf_counter()
        reporter.on_event(ev.PreviewReady(make_preview(latents[i % 4], mapper), section=1, step=i + 1))
        if i == updates - 1:
            lifecycle.finish(job_id, _succeeded(), result={"frames": 37}, fields=reporter.close())
        else:
            reporter.on_event(ev.Progress((i + 1) / steps, 1, 1, i + 1, steps, 1.0, 1.0))
        cost.append((time.perf_counter() - t0) * 1000)
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    return cost


def _succeeded() -> Any:
    from tasks.protocol import JobState

    return JobState.SUCCEEDED


def measure(stack: BenchStack, mode: str, watchers: int, updates: int, rate: float) -> dict[str, Any]:
    from tasks.protocol import Keys

    png = _png()
    job = httpx.post(stack.base + "/api/jobs", files={"image": ("in.png", png, "image/png")}, timeout=30).json()
    job_id = job["id"]
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(
        target=_watch_process,
        args=(mode, watchers, f"{stack.ws_base}/ws/jobs/{job_id}", stack.redis_url, Keys.celery_meta(job_id), child),
    )
    proc.start()
    assert parent.poll(180) and parent.recv() == "ready", "watchers did not connect"
    time.sleep(0.5)
    r = stack.redis()
    before = commandstats(r)
    publish_ms = _publish(stack, job_id, updates, rate)
    if mode != "ws":
        time.sleep(1.5)  # let the slowest poller see the end
    after = commandstats(r)
    assert parent.poll(120), "watchers did not finish"
    per_watcher = parent.recv()
    proc.join(30)
    published = updates  # seq 1..updates
    latencies = [(recv - emitted) * 1000 for w in per_watcher for (_s, emitted, recv) in w]
    received = [len({s for (s, _e, _r) in w}) / published for w in per_watcher]
    delta = command_delta(before, after)
    return {
        "mode": mode,
        "watchers": watchers,
        "updates": published,
        "rate_hz": rate,
        "latency_ms": percentiles(latencies),
        "received_fraction": {"min": min(received), "mean": sum(received) / len(received), "max": max(received)},
        "redis_commands_per_update": sum(delta.values()) / published,
        "redis_commands": delta,
        "publish_ms": percentiles(publish_ms),
        "raw_latencies_ms": [round(v, 2) for v in latencies],
    }


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def run(smoke: bool = False, watchers: tuple[int, ...] | None = None, updates: int | None = None,
        rate: float | None = None) -> dict[str, Any]:  # fmt: skip
    watchers = watchers or ((2,) if smoke else (1, 50, 500))
    updates = updates or (6 if smoke else 40)
    rate = rate or (5.0 if smoke else 2.0)
    runs = []
    with BenchStack(worker=False) as stack:
        for n in watchers:
            runs.append(measure(stack, "ws", n, updates, rate))
        for mode in ("poll-1s", "poll-100ms"):
            runs.append(measure(stack, mode, max(watchers), updates, rate))
    return {"watchers": list(watchers), "updates": updates, "rate_hz": rate, "runs": runs}


def markdown(result: dict[str, Any]) -> str:
    rows, nan = [], float("nan")
    ours = {r["watchers"]: r for r in result["runs"] if r["mode"] == "ws"}
    for r in result["runs"]:
        lat, got = r["latency_ms"], r["received_fraction"]
        rows.append(
            f"| {r['mode']} | {r['watchers']} | {lat.get('p50', nan):.1f} | {lat.get('p95', nan):.1f} "
            f"| {lat.get('p99', nan):.1f} | {100 * got['min']:.0f} % / {100 * got['mean']:.0f} % "
            f"| {r['redis_commands_per_update']:.1f} |"
        )
    n = max(result["watchers"])
    ratios = []
    for mode in ("poll-1s", "poll-100ms"):
        base = next(r for r in result["runs"] if r["mode"] == mode)
        mine = ours[n]
        ratios.append(
            f"| ours / {mode} at {n} watchers | {mine['latency_ms']['p50'] / base['latency_ms']['p50']:.3f} "
            f"| {mine['latency_ms']['p99'] / base['latency_ms']['p99']:.3f} "
            f"| {mine['redis_commands_per_update'] / base['redis_commands_per_update']:.3f} |"
        )
    return "\n".join(
        [
            "### Preview latency, delivery and Redis work per update",
            "",
            f"Command: `python -m bench.bench_latency` ({result['updates']} updates at {result['rate_hz']:g} Hz, "
            "each with a fresh 640-bucket preview, published by the real `Reporter` through Celery's Redis "
            "backend; watchers in a separate process).",
            "",
            "| mode | watchers | p50 ms | p95 ms | p99 ms | updates received (worst / mean watcher) "
            "| Redis commands per update |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "| ratio | p50 latency | p99 latency | Redis commands per update |",
            "|---|---|---|---|",
            *ratios,
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--watchers", default="1,50,500")
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = run(watchers=tuple(int(w) for w in args.watchers.split(",")), updates=args.updates, rate=args.rate)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
