"""Preview cost per sampling step, next to a tiny transformer step.

    python -m bench.bench_preview [--repeat N] [--json OUT.json]

Measures latent (x0) -> RGB -> JPEG strip for one 9-frame section at FramePack's 640
bucket (640x608 -> 80x76 latents) and at 832x480 (60x104 latents), median of N runs,
with torch limited to one thread as in a worker that leaves the rest to the model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = bench_previews(args.repeat)
    step = bench_tiny_step()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| latents of | strip (px) | map ms | JPEG ms | preview ms | JPEG bytes | preview / tiny step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["total_ms"] / step
        print(
            f"| {r['size']} | {r['strip_px']} | {r['map_ms']} | {r['jpeg_ms']} | **{r['total_ms']}** "
            f"| {r['jpeg_bytes']} | {ratio:.2f} |"
        )
    print(f"| tiny transformer step (64 px, 9 latent frames) | | | | {step} | | 1 |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"previews": rows, "tiny_step_ms": step}, f, indent=2)


if __name__ == "__main__":
    main()
