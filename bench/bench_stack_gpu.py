"""The whole stack on a GPU: jobs through Celery on CUDA, watched over the WebSocket.

    python -m bench.bench_stack_gpu [--profile tiny|random-full] [--jobs none,none,mag,first_block]
                                    [--seconds 2.4] [--steps 25] [--direct] [--json OUT] [--md OUT]

Why: ``tests/test_cuda.py`` and the other GPU benchmarks call ``generate()`` in one process.
Every deployment runs something else: ``python -m stack`` (what ``make run`` calls) starting
the embedded Valkey, gunicorn and a prefork Celery worker whose pool child loads the model
after the fork and samples on CUDA, with ``update_state`` previews fanned out to WebSockets.
This starts exactly that (``GPUS=0``), and records, from outside, what a user would see:

- ``/readyz`` while the model loads and warms up (503 and its reason) and after (200);
- ``/api/info``'s worker: its device (``cuda``), ``CUDA_VISIBLE_DEVICES`` and GPU name;
- per job: submit over HTTP, every WebSocket message to the final one, the hop latency of
  each preview (receive time minus the worker's ``emitted_at``, one clock), seconds per
  step and per output frame (the result's timings), transformer calls skipped, the video
  downloaded and decoded;
- ``/metrics`` (the worker's speed options and warm-up), and the GPU's memory before the
  start, while loaded and after the stack stopped (is it freed?).

``--direct`` then runs the same job through ``generate()`` alone in this process (same
profile, speed options and warm-up), for seconds per step through Celery against the model
alone.  Without CUDA the script runs the tiny profile on the CPU (checks its code; the
numbers say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from stack import ROOT, free_port


def gpu_memory_used_mb() -> float | None:
    """What the driver says is in use on GPU 0 (every process), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def cuda_available() -> bool:
    """Asked in a child: CUDA must not start in this process before the direct run."""
    code = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def noise_png(width: int, height: int, seed: int = 3) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


class Watch(threading.Thread):
    """Every message of one job's stream (the Python client's WebSocket watch), with its
    receive time, to the final one."""

    def __init__(self, base: str, job_id: str, timeout: float):
        super().__init__(daemon=True)
        self.base, self.job_id, self.timeout = base, job_id, timeout
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.error: str | None = None

    def run(self) -> None:
        from framepack_client import FramePackClient

        try:
            with FramePackClient(self.base, timeout=self.timeout) as client:
                for msg in client.watch(self.job_id, reconnect=False):
                    self.messages.append((time.time(), msg))
        except Exception as exc:  # noqa: BLE001
            self.error = repr(exc)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def run_job(base: str, form: dict[str, str], png: bytes, timeout: float) -> dict[str, Any]:
    t0 = time.time()
    r = httpx.post(base + "/api/jobs", files={"image": ("in.png", png, "image/png")}, data=form, timeout=60)
    if r.status_code != 202:
        return {"form": form, "error": f"submit {r.status_code}: {r.text[:300]}"}
    job = r.json()
    watch = Watch(base, job["id"], timeout)
    watch.start()
    watch.join(timeout + 5)
    done = time.time()
    view = httpx.get(base + f"/api/jobs/{job['id']}", timeout=30).json()
    result = view.get("result") or {}
    kinds: dict[str, int] = {}
    hops, previews = [], 0
    for received, msg in watch.messages:
        kinds[msg.get("type", "?")] = kinds.get(msg.get("type", "?"), 0) + 1
        if msg.get("preview"):
            previews += 1
            if msg.get("emitted_at"):
                hops.append((received - msg["emitted_at"]) * 1000)
    final = next((m for _, m in watch.messages if m.get("type") == "final"), {})
    video = {"status": None}
    if final.get("state") == "succeeded":
        v = httpx.get(base + f"/api/jobs/{job['id']}/video", timeout=60)
        video = {"status": v.status_code, "bytes": len(v.content), "frames": _decoded_frames(v.content)}
    timings = result.get("timings") or {}
    frames = result.get("frames") or 0
    return {
        "form": form, "id": job["id"], "state": final.get("state"), "error": watch.error or view.get("error"),
        "submit_to_final_s": round(done - t0, 2), "messages": kinds, "previews": previews,
        "preview_hop_ms": {"p50": _pct(hops, 0.5), "p95": _pct(hops, 0.95), "max": _pct(hops, 1.0)},
        "frames": frames, "timings": timings, "per_step_s": timings.get("per_step"),
        "s_per_frame": round(timings["total"] / frames, 4) if frames and timings.get("total") else None,
        "cache": result.get("cache"), "speed": result.get("speed"), "profile": result.get("profile"),
        "video": video,
    }  # fmt: skip


def _decoded_frames(data: bytes) -> int | None:
    try:
        import av

        with av.open(io.BytesIO(data)) as container:
            return sum(1 for _ in container.decode(video=0))
    except Exception:  # noqa: BLE001
        return None


def watch_readyz(base: str, proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Poll /readyz until 200: every change of (status, reason) with its second since start."""
    t0, seen, last = time.monotonic(), [], None
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return {"changes": seen, "error": f"the launcher exited ({proc.returncode})"}
        try:
            r = httpx.get(base + "/readyz", timeout=5)
            now = (r.status_code, r.json().get("reason"))
        except (httpx.HTTPError, ValueError) as exc:
            now = (None, type(exc).__name__)
        if now != last:
            seen.append({"s": round(time.monotonic() - t0, 1), "status": now[0], "reason": now[1]})
            last = now
        if now[0] == 200:
            return {"changes": seen, "ready_s": round(time.monotonic() - t0, 1)}
        time.sleep(0.25)
    return {"changes": seen, "error": f"not ready in {timeout} s"}


def metrics_lines(base: str) -> list[str]:
    text = httpx.get(base + "/metrics", timeout=30).text
    keep = ("framepack_worker_speed", "framepack_worker_warm_up", "framepack_worker_info", "framepack_jobs_",
            "framepack_workers_ready")  # fmt: skip
    return [line for line in text.splitlines() if line.startswith(keep)][:40]


def run_stack(profile: str, jobs: list[str], seconds: float, steps: int, gpu: bool, timeout: float,
              log_dir: Path) -> dict[str, Any]:  # fmt: skip
    state = Path(tempfile.mkdtemp(prefix="fp-stack-gpu-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ours = ("REDIS_URL", "CELERY_", "FRAMEPACK_", "RESULTS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours) or k in ("FRAMEPACK_COMPILE",)}
    env.update(PORT=str(port), FRAMEPACK_STACK_DIR=str(state), FRAMEPACK_PROFILE=profile, PYTHONUNBUFFERED="1")
    if gpu:
        env["GPUS"] = "0"
    out: dict[str, Any] = {"profile": profile, "gpu_memory_mb": {"before": gpu_memory_used_mb()}, "jobs": []}
    log = open(log_dir / f"stack-{profile}.log", "wb")  # noqa: SIM115
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "stack"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        out["readyz"] = watch_readyz(base, proc, timeout)
        if "ready_s" not in out["readyz"]:
            return out
        out["gpu_memory_mb"]["ready"] = gpu_memory_used_mb()
        info = httpx.get(base + "/api/info", timeout=30).json()
        out["workers"] = [{k: w.get(k) for k in ("node", "device", "gpu", "gpu_name", "speed", "ready")}
                          for w in info.get("workers", [])]  # fmt: skip
        size = (608, 640) if profile != "tiny" else (64, 64)
        png = noise_png(*size)
        for i, cache in enumerate(jobs):
            form = {"prompt": "The girl dances gracefully, with clear movements, full of charm.", "seed": str(i + 1),
                    "total_second_length": str(seconds), "steps": str(steps), "cache": cache}  # fmt: skip
            row = run_job(base, form, png, timeout)
            row["name"] = f"job {i + 1}: cache={cache}"
            out["jobs"].append(row)
            print(json.dumps({k: row.get(k) for k in ("name", "state", "submit_to_final_s", "per_step_s",
                                                      "s_per_frame", "previews", "preview_hop_ms", "cache")}),
                  flush=True)  # fmt: skip
        out["gpu_memory_mb"]["after_jobs"] = gpu_memory_used_mb()
        out["metrics"] = metrics_lines(base)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (a launcher that failed has exited)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops `make run`
        try:
            out["launcher_exit"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out["launcher_exit"] = f"killed after 60 s ({proc.wait()})"
        log.close()
        out["stack_s"] = round(time.monotonic() - t0, 1)
    freed_at = time.monotonic()
    before = out["gpu_memory_mb"]["before"]
    while before is not None and time.monotonic() - freed_at < 20:
        used = gpu_memory_used_mb()
        if used is not None and used <= before + 256:
            break
        time.sleep(0.5)
    out["gpu_memory_mb"]["after_stop"] = gpu_memory_used_mb()
    out["gpu_memory_mb"]["freed_within_s"] = round(time.monotonic() - freed_at, 1)
    return out


def run_direct(profile: str, seconds: float, steps: int) -> dict[str, Any]:
    """The same job through ``generate()`` alone in this process (the worker's models code)."""
    import torch
    from PIL import Image

    from diffusers_helper.generate import OutputLayout, generate, warm_up
    from diffusers_helper.params import JobParams, Variant
    from diffusers_helper.profiles import Models, resolve_profile
    from diffusers_helper.speed import EAGER
    from tasks.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="fp-direct-"))
    t = time.perf_counter()
    models = Models(resolve_profile(profile))
    models.load_shared()
    models.transformer(Variant.FRAMEPACK)
    load_s = time.perf_counter() - t
    options = models.set_speed(Settings.from_env(os.environ).speed)
    warm_s = warm_up(models, Variant.FRAMEPACK, work / "warm") if options != EAGER else None
    size = (608, 640) if profile != "tiny" else (64, 64)
    image = Image.open(io.BytesIO(noise_png(*size))).convert("RGB")  # the stack's jobs' image
    params = JobParams(prompt="The girl dances gracefully, with clear movements, full of charm.", seed=1,
                       total_second_length=seconds, steps=steps, cache="none",
                       resolution=models.profile.default_resolution)  # fmt: skip
    t = time.perf_counter()
    r = generate(params, image, models=models, output=OutputLayout(work / "job"))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - t
    return {"load_s": round(load_s, 1), "warm_up_s": round(warm_s, 1) if warm_s else None, "speed": r.speed,
            "frames": r.frames, "total_s": round(total, 2), "timings": r.timings,
            "per_step_s": r.timings.get("per_step"), "s_per_frame": round(total / max(r.frames, 1), 4)}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = ["### The whole stack on a GPU: jobs through Celery (`python -m bench.bench_stack_gpu`)", ""]
    for run in result["runs"]:
        ready = run.get("readyz", {})
        lines += [f"**Profile `{run['profile']}`** — workers: {json.dumps(run.get('workers'))}", "",
                  f"- /readyz: {json.dumps(ready.get('changes'))}" + (f"; 200 after {ready['ready_s']} s"
                                                                       if "ready_s" in ready else ""),
                  f"- GPU memory (MB, nvidia-smi): {json.dumps(run.get('gpu_memory_mb'))}",
                  f"- launcher exit: {run.get('launcher_exit')}, stack up for {run.get('stack_s')} s", "",
                  "| job | state | submit→final s | s / step | s / output frame | frames (decoded) | previews | "
                  "preview hop ms p50 / p95 / max | transformer calls (skipped) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for j in run.get("jobs", []):
            hop, cache = j.get("preview_hop_ms") or {}, j.get("cache") or {}
            lines.append(f"| {j.get('name')} | {j.get('state')} | {j.get('submit_to_final_s')} | {j.get('per_step_s')} "
                         f"| {j.get('s_per_frame')} | {j.get('frames')} ({(j.get('video') or {}).get('frames')}) "
                         f"| {j.get('previews')} | {hop.get('p50')} / {hop.get('p95')} / {hop.get('max')} "
                         f"| {cache.get('transformer_calls')} ({cache.get('skipped')}) |")  # fmt: skip
        direct = run.get("direct")
        if direct:
            lines += ["", f"- `generate()` alone, same job: {direct.get('per_step_s')} s / step, "
                      f"{direct.get('s_per_frame')} s / output frame (load {direct.get('load_s')} s, warm-up "
                      f"{direct.get('warm_up_s')} s)"]  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None, help="tiny (default without CUDA) or random-full")
    ap.add_argument("--jobs", default="none", help="comma-separated cache mode per job, in order")
    ap.add_argument("--seconds", type=float, default=2.4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--direct", action="store_true", help="then the same job through generate() alone")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for readiness and for each job")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    gpu = cuda_available()
    profile = args.profile or ("random-full" if gpu else "tiny")
    out_dir = Path(args.json).parent if args.json else Path(tempfile.mkdtemp(prefix="fp-stack-gpu-out-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "stack_gpu", "cuda": gpu, "runs": []}
    path = Path(args.json) if args.json else None
    run = run_stack(profile, args.jobs.split(","), args.seconds, args.steps, gpu, args.timeout, out_dir)
    result["runs"].append(run)
    if path:
        path.write_text(json.dumps(result, indent=1))
    if args.direct and "ready_s" in run.get("readyz", {}):
        try:
            run["direct"] = run_direct(profile, args.seconds, args.steps)
        except Exception as exc:  # noqa: BLE001
            run["direct"] = {"error": repr(exc)}
        print(json.dumps({"direct": run["direct"]}), flush=True)
    if path:
        path.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    if any(j.get("state") != "succeeded" for j in run.get("jobs", [])) or "ready_s" not in run.get("readyz", {}):
        sys.exit(1)


if __name__ == "__main__":
    main()
