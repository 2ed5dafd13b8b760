"""Section checkpoints: their size, what writing one costs, and the GPU time they save.

    python -m bench.bench_checkpoint [--smoke] [--json OUT.json]

A checkpoint (``diffusers_helper/checkpoint.py``) is rewritten after every section.  Its
size grows with the video: the time-ordered latents (9 latent frames per section at the
default window) plus a constant part (the start image's latent and SigLIP embeddings, the
generator's state).  Measured two ways in one run:

- the tiny profile: real jobs through ``generate()`` (64 px, 1-4 sections), file sizes and
  the write time per section;
- the 640 bucket of the real model: the same ``checkpoint.save`` on tensors of the real
  shapes (16 x 80 x 76 latents, 729 x 1152 bf16 SigLIP embeddings), 1-8 sections.

GPU time saved per lost worker = sections already finished x time per section; the time
per section is the H200 measurement in ``bench/gpu_results.json`` (high-VRAM, 25 steps).
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.bench_overhead import noise_png
from bench.harness import bench_main

GPU_RESULTS = Path(__file__).with_name("gpu_results.json")


def _real_tensors(sections: int) -> dict[str, torch.Tensor]:
    h, w, lws = 80, 76, 9  # the 640 bucket (640x608) in latents, FramePack's window
    frames = 1 + sections * lws  # F1: the start image's latent, then 9 per section
    return {
        "timeline": torch.randn(1, 16, frames, h, w),
        "image_latents": torch.randn(1, 16, 1, h, w),
        "image_embeds": torch.randn(1, 729, 1152, dtype=torch.bfloat16),
        "generator_state": torch.Generator().get_state(),
    }


def _tiny(smoke: bool) -> list[dict[str, Any]]:
    from diffusers_helper.generate import OutputLayout, generate
    from diffusers_helper.params import JobParams, Variant
    from diffusers_helper.profiles import Models, resolve_profile

    models = Models(resolve_profile("tiny"))
    rows = []
    for seconds in (1.2, 2.4) if smoke else (1.2, 2.4, 3.6, 4.8):
        with tempfile.TemporaryDirectory() as d:
            params = JobParams(total_second_length=seconds, steps=2, seed=1, model=Variant.FRAMEPACK_F1)
            image = Image.open(io.BytesIO(noise_png(64, 64)))
            result = generate(params, image, models=models, output=OutputLayout(Path(d)))
            rows.append({"sections": result.sections, "bytes": result.checkpoint_bytes,
                         "video_bytes": result.video.stat().st_size})  # fmt: skip
    return rows


def _real(smoke: bool) -> list[dict[str, Any]]:
    from diffusers_helper import checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for sections in (1, 2) if smoke else (1, 2, 4, 8):
            tensors = _real_tensors(sections)
            times = []
            for _ in range(1 if smoke else 3):
                t = time.perf_counter()
                size = checkpoint.save(Path(d) / "c.safetensors", tensors, {"done": sections, "decodes": []})
                times.append(time.perf_counter() - t)
            rows.append({"sections": sections, "bytes": size, "write_s": round(statistics.median(times), 3)})
    return rows


def run(smoke: bool = False) -> dict[str, Any]:
    real = _real(smoke)
    per_section = (real[-1]["bytes"] - real[0]["bytes"]) / (real[-1]["sections"] - real[0]["sections"])
    gpu = json.loads(GPU_RESULTS.read_text()) if GPU_RESULTS.exists() else None
    section_s = None
    if gpu:
        high = next(r for r in gpu["runs"] if r["name"] == "high-VRAM")
        section_s = round(high["timings"]["sampling"] / high["sections"], 2)
    return {"benchmark": "checkpoint", "smoke": smoke, "tiny": _tiny(smoke), "real_640": real,
            "real_bytes_per_section": round(per_section), "gpu_section_s": section_s,
            "gpu_device": (gpu or {}).get("gpu", {}).get("name")}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    mb = 2**20
    lines = ["### Section checkpoints: size, write time, GPU time saved", "",
             "Command: `python -m bench.bench_checkpoint`.", "",
             "| profile | sections | checkpoint | write | video (mp4) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in result["tiny"]:
        lines.append(f"| tiny, 64 px (real jobs) | {r['sections']} | {r['bytes'] / 1024:.0f} KiB | – "
                     f"| {r['video_bytes'] / 1024:.0f} KiB |")  # fmt: skip
    for r in result["real_640"]:
        lines.append(f"| real model, 640 bucket (real shapes) | {r['sections']} | {r['bytes'] / mb:.1f} MiB "
                     f"| {r['write_s']} s | – |")  # fmt: skip
    per = result["real_bytes_per_section"]
    lines.append(
        f"\nAt the 640 bucket a checkpoint grows by **{per / mb:.2f} MiB per section** (9 latent frames of "
        f"16 x 80 x 76 in float32: kept exact, so a resumed video is identical), on top of about "
        f"{(result['real_640'][0]['bytes'] - per) / mb:.1f} MiB for the start image's latent and SigLIP "
        "embeddings; only the latest checkpoint of a job is kept."
    )
    if result["gpu_section_s"]:
        s = result["gpu_section_s"]
        saved = ", ".join(f"{k} sections: {k * s / 60:.1f} min" for k in (1, 4, 7))
        lines.append(
            f"\nGPU time saved per lost worker = finished sections x time per section. On the "
            f"{result['gpu_device']} one 640-bucket section took **{s} s** of sampling (25 steps, "
            f"`bench/gpu_results.json`): a worker lost in section k+1 of a job no longer costs the k finished "
            f"ones again ({saved}). Writing the checkpoint costs well under a second of that."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    bench_main(run, markdown, __doc__, "fewer sizes (a check, not a measurement)")


if __name__ == "__main__":
    main()
