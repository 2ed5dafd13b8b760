"""Preview cost per sampling step, next to a tiny transformer step.

    python -m bench.bench_preview [--smoke] [--json OUT.json]

Measures latent (x0) -> RGB -> JPEG strip for one 9-frame section at FramePack's 640
bucket (640x608 -> 80x76 latents) and at 832x480 (60x104 latents), median of N runs,
with torch limited to one thread as in a worker that leaves the rest to the model.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from pathlib import Path

import torch

from bench.harness import bench_main
from diffusers_helper.preview import LatentToRGB, encode_jpeg, make_preview, rgb_strip

SIZES = {"640x608 (640 bucket)": (640, 608), "832x480": (480, 832)}


def _median_ms(fn, repeat: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def bench_previews(repeat: int = 200) -> list[dict]:
    mapper = LatentToRGB(16)
    rows = []
    for name, (h, w) in SIZES.items():
        x0 = torch.randn(1, 16, 9, h // 8, w // 8)
        rgb = mapper(x0)
        strip = rgb_strip(rgb)
        rows.append(
            {
                "size": name,
                "strip_px": f"{strip.shape[1]}x{strip.shape[0]}",
                "map_ms": round(_median_ms(lambda: rgb_strip(mapper(x0)), repeat), 3),
                "jpeg_ms": round(_median_ms(lambda: encode_jpeg(strip), repeat), 3),
                "total_ms": round(_median_ms(lambda: make_preview(x0, mapper), repeat), 3),
                "jpeg_bytes": len(make_preview(x0, mapper).jpeg),
            }
        )
    return rows


def bench_tiny_step(repeat: int = 50) -> float:
    """One forward of the tiny FramePack transformer at the tiny default size (64 px)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from diffusers_helper.tiny import transformer_config

    torch.manual_seed(0)
    t = HunyuanVideoFramepackTransformer3DModel(**transformer_config()).eval()
    lat = torch.randn(1, 16, 9, 8, 8)
    kw = dict(
        hidden_states=lat,
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 20, 16),
        encoder_attention_mask=torch.ones(1, 20),
        pooled_projections=torch.randn(1, 8),
        image_embeds=torch.randn(1, 16, 32),
        indices_latents=torch.arange(1, 10),
        guidance=torch.tensor([10000.0]),
        latents_clean=torch.randn(1, 16, 2, 8, 8),
        indices_latents_clean=torch.tensor([0, 10]),
        latents_history_2x=torch.randn(1, 16, 2, 8, 8),
        indices_latents_history_2x=torch.tensor([11, 12]),
        latents_history_4x=torch.randn(1, 16, 16, 8, 8),
        indices_latents_history_4x=torch.arange(13, 29),
        return_dict=False,
    )
    with torch.no_grad():
        return round(_median_ms(lambda: t(**kw), repeat), 3)


def bench_update_state(repeat: int = 100) -> list[dict]:
    """The worker's write per update: Celery's Redis backend storing a meta with the preview
    (GET + SETEX + PUBLISH), against an embedded Valkey, per preview size."""
    import tempfile

    from stack import Valkey
    from tasks.celery_app import make_celery
    from tasks.protocol import JobState, make_meta, preview_field

    mapper = LatentToRGB(16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Valkey(Path(tmp)) as valkey:
        app = make_celery()
        app.conf.update(result_backend=valkey.url + "/0", broker_url=valkey.url + "/0")
        for name, (h, w) in SIZES.items():
            p = make_preview(torch.randn(1, 16, 9, h // 8, w // 8), mapper)
            b64 = base64.b64encode(p.jpeg).decode()
            meta = make_meta(1, JobState.RUNNING, event="progress", progress=0.5, step=1, steps=25,
                             preview=preview_field(b64, p.frames, p.tile_width, p.tile_height))  # fmt: skip
            rows.append(
                {
                    "size": name,
                    "base64_ms": round(_median_ms(lambda: base64.b64encode(p.jpeg).decode(), repeat), 3),
                    "update_state_ms": round(
                        _median_ms(lambda: app.backend.store_result("bench-job", meta, "PROGRESS"), repeat), 3
                    ),
                    "meta_bytes": len(json.dumps(meta)),
                }
            )
    return rows


def run(smoke: bool = False) -> dict:
    torch.set_num_threads(1)
    repeat = 20 if smoke else 200
    previews = bench_previews(repeat)
    writes = {r["size"]: r for r in bench_update_state(10 if smoke else 100)}
    step = bench_tiny_step(10 if smoke else 50)
    for r in previews:
        w = writes[r["size"]]
        r.update(base64_ms=w["base64_ms"], update_state_ms=w["update_state_ms"], meta_bytes=w["meta_bytes"])
        r["preview_b64_ms"] = round(r["total_ms"] + r["base64_ms"], 3)
        r["preview_fraction_of_tiny_step"] = round(r["preview_b64_ms"] / step, 3)
        r["write_fraction_of_tiny_step"] = round(r["update_state_ms"] / step, 3)
    return {"previews": previews, "tiny_step_ms": step, "threads": 1}


def markdown(result: dict) -> str:
    step = result["tiny_step_ms"]
    lines = [
        "### Preview cost per step in the worker",
        "",
        "Command: `python -m bench.bench_preview` (medians; torch on 1 thread; the write goes to an embedded "
        "Valkey through Celery's Redis result backend).",
        "",
        "| latents of | strip px | latent→RGB ms | JPEG ms | base64 ms | **preview total ms** | update_state ms "
        "| meta KB | preview / tiny step | write / tiny step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["previews"]:
        lines.append(
            f"| {r['size']} | {r['strip_px']} | {r['map_ms']} | {r['jpeg_ms']} | {r['base64_ms']} "
            f"| **{r['preview_b64_ms']}** | {r['update_state_ms']} | {r['meta_bytes'] / 1024:.0f} "
            f"| {r['preview_fraction_of_tiny_step']:.2f} | {r['write_fraction_of_tiny_step']:.2f} |"
        )
    lines += [
        "",
        f"A tiny-profile transformer step (64 px, 9 latent frames, 1 thread) takes {step} ms; a real FramePack "
        "step on a GPU takes seconds, so a preview plus its write is well under 1 % of a real step. "
        "Target ≤ 1.5 ms per preview at the 640 bucket.",
    ]
    return "\n".join(lines)


def main() -> None:
    bench_main(run, markdown, __doc__, "fewer repetitions (a check, not a measurement)")


if __name__ == "__main__":
    main()
