"""Seconds per output frame of the full-size FramePack transformer on a CUDA GPU.

    python -m bench.bench_gpu [--smoke] [--tiny-cpu] [--json OUT.json]

Why: the real weights (~25 GB) cannot be downloaded here, but the speed of a GPU worker is
set by the transformer's *architecture*, not its weights.  So this builds
``HunyuanVideoFramepackTransformer3DModel`` at FramePack's full size (facts: 24 heads x 128,
20 dual + 40 single blocks, about 13 B parameters) with random weights in bf16 on CUDA
and times what one section costs: 25 sampling steps at the 640 bucket (640x608 -> 9 latent
frames of 80x76), with the clean and history latents the pipeline packs in front
(clean 2, 2x history 2, 4x history 16 frames), 256 text tokens, 729 SigLIP tokens and the
distilled guidance; no step cache (TeaCache off), batch 1 (cfg 1, FramePack's default).
The inputs are built as ``HunyuanVideoFramepackPipeline`` builds them for the first
section of the original model (inverted anti-drifting indices).  One section yields
``latent_window_size * 4 = 36`` output frames, hence seconds per frame = section / 36.
Text, image and VAE encode/decode are not included (once per job or per section, small
next to 25 transformer forwards).

Without CUDA the benchmark reports itself skipped.  ``--tiny-cpu`` runs the same input
building and timing code with the tiny profile's config on CPU at 64 px, so that code path
is exercised on any machine; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.harness import bench_main, machine_facts

STEPS, WARMUP = 25, 2
LATENT_WINDOW = 9
HISTORY_SIZES = (1, 2, 16)  # 1x, 2x, 4x history frames (the original model's order)
GUIDANCE = 10.0  # the `gs` default

#: FramePack's transformer (facts, section 3): the config of lllyasviel/FramePackI2V_HY.
FULL_CONFIG: dict[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), image_condition_type=None, has_image_proj=True, image_proj_dim=1152,
    has_clean_x_embedder=True,
)  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """What is measured: a config and the shapes of one section's transformer inputs."""

    name: str
    height: int
    width: int
    text_tokens: int
    image_tokens: int  # SigLIP patch tokens: 729 for the real 384 px encoder
    device: str
    dtype: str


FULL = Setup("full FramePack (13 B), bf16", 640, 608, 256, 729, "cuda", "bfloat16")
TINY_CPU = Setup("tiny profile config, fp32, CPU sanity check", 64, 64, 256, 16, "cpu", "float32")


def build_model(config: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """Random weights created directly on ``device`` in ``dtype`` (13 B in fp32 would need 52 GB)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = HunyuanVideoFramepackTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)  # already on `device` in `dtype`: no cast needed


def section_inputs(config: dict[str, Any], s: Setup, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
    """Initial latents and the conditioning kwargs, as the pipeline passes them for section 1
    of the original model: frame indices [prefix 0 | window 1..9 | 1x 10 | 2x 11-12 | 4x 13-28]."""
    dev, c = torch.device(s.device), config["in_channels"]
    h, w = s.height // 8, s.width // 8
    g = torch.Generator("cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev)

    indices = torch.arange(0, 1 + LATENT_WINDOW + sum(HISTORY_SIZES))  # on the CPU, as in the pipeline
    prefix, window, h1x, h2x, h4x = indices.split([1, LATENT_WINDOW, *HISTORY_SIZES])
    history = randn(1, c, sum(HISTORY_SIZES), h, w)
    hist_1x, hist_2x, hist_4x = history.split(list(HISTORY_SIZES), dim=2)
    latents_clean = torch.cat([randn(1, c, 1, h, w), hist_1x], dim=2)  # start-image latent + 1x history
    cond = dict(
        encoder_hidden_states=randn(1, s.text_tokens, config["text_embed_dim"]).to(dtype),
        encoder_attention_mask=torch.ones(1, s.text_tokens, device=dev, dtype=dtype),
        pooled_projections=randn(1, config["pooled_projection_dim"]).to(dtype),
        image_embeds=randn(1, s.image_tokens, config["image_proj_dim"]).to(dtype),
        indices_latents=window,
        guidance=torch.tensor([GUIDANCE], device=dev, dtype=dtype) * 1000.0,
        latents_clean=latents_clean.to(dtype),
        indices_latents_clean=torch.cat([prefix, h1x]),
        latents_history_2x=hist_2x.to(dtype),
        indices_latents_history_2x=h2x,
        latents_history_4x=hist_4x.to(dtype),
        indices_latents_history_4x=h4x,
        return_dict=False,
    )
    return randn(1, c, LATENT_WINDOW, h, w), cond


def time_section(model: Any, latents: torch.Tensor, cond: dict[str, Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` forwards (after ``warmup``), with a flow-matching Euler
    update in between as the scheduler does; synchronised per step on CUDA."""
    cuda = latents.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    dtype = model.dtype
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(hidden_states=latents.to(dtype), timestep=torch.full((1,), 1000.0, device=latents.device), **cond)
        sync()
        for i in range(steps):
            t0 = time.perf_counter()
            timestep = (sigmas[i] * 1000).expand(1).to(latents.device)
            pred = model(hidden_states=latents.to(dtype), timestep=timestep, **cond)[0]
            latents = latents + (sigmas[i + 1] - sigmas[i]).item() * pred.float()
            sync()
            times.append(time.perf_counter() - t0)
    return times


def measure(config: dict[str, Any], s: Setup, steps: int, warmup: int) -> dict[str, Any]:
    dtype = getattr(torch, s.dtype)
    t0 = time.perf_counter()
    model = build_model(config, s.device, dtype)
    build_s = time.perf_counter() - t0
    latents, cond = section_inputs(config, s, dtype)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = time_section(model, latents, cond, steps, warmup)
    section_s = statistics.fmean(step_s) * STEPS  # = sum(step_s) when all 25 steps were timed
    frames = LATENT_WINDOW * 4
    lat_h, lat_w = s.height // 8, s.width // 8
    return {
        "setup": asdict(s),
        "device_name": torch.cuda.get_device_name() if s.device == "cuda" else machine_facts()["cpu"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "latent_shape": [LATENT_WINDOW, lat_h, lat_w],
        "tokens": LATENT_WINDOW * (lat_h // config["patch_size"]) * (lat_w // config["patch_size"]),
        "steps_timed": steps,
        "warmup_steps": warmup,
        "step_s": [round(x, 5) for x in step_s],
        "median_step_s": round(statistics.median(step_s), 5),
        "section_s": round(section_s, 4),
        "frames_per_section": frames,
        "seconds_per_frame": round(section_s / frames, 5),
        "build_s": round(build_s, 2),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if s.device == "cuda" else None,
    }


def run(smoke: bool = False, tiny_cpu: bool = False) -> dict[str, Any]:
    steps, warmup = (3, 1) if smoke else (STEPS, WARMUP)
    base = {"benchmark": "gpu", "smoke": smoke, "torch": torch.__version__}
    if tiny_cpu:
        from diffusers_helper.tiny import transformer_config

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {**base, "tiny_cpu": True, **measure(transformer_config(), TINY_CPU, steps, warmup)}
        finally:
            torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU visible to torch"
        return {**base, "skipped": f"no CUDA device: torch.cuda.is_available() is False ({why}, torch "
                                   f"{torch.__version__})"}  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = True  # as a worker would run; bf16 matmuls are unaffected
    return {**base, "tiny_cpu": False, **measure(FULL_CONFIG, FULL, steps, warmup)}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e3:.0f} k"


def markdown(result: dict[str, Any]) -> str:
    head = "### GPU: seconds per output frame (full-size FramePack transformer)\n\n"
    cmd = "python -m bench.bench_gpu"
    if "skipped" in result:
        return head + (
            f"Skipped: {result['skipped']}. Nothing was measured on this machine. Run `{cmd}` on a CUDA machine "
            f"(about 30 GB of GPU memory; random weights, nothing to download); `{cmd} --tiny-cpu` exercises "
            f"the same input-building and timing code with the tiny config on CPU.\n"
        )
    s = result["setup"]
    lat = "×".join(map(str, result["latent_shape"]))
    rows = [
        "| model | device | size (px) | latents | steps timed | median s/step | s/section (25 steps) | frames/section "
        "| **s/output frame** | peak GPU GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['name']} ({_count(result['parameters'])} params) | {result['device_name']} | {s['height']}×{s['width']} "
        f"| {lat} | {result['steps_timed']} | {result['median_step_s']:.3f} | {result['section_s']:.2f} "
        f"| {result['frames_per_section']} | **{result['seconds_per_frame']:.4f}** "
        f"| {result['peak_gpu_memory_gb'] if result['peak_gpu_memory_gb'] is not None else '–'} |",
    ]
    if result.get("tiny_cpu"):
        reading = (
            f"CPU sanity check only: the tiny profile's transformer config ({_count(result['parameters'])} params, "
            f"fp32, one thread) at {s['height']}×{s['width']} went through the same input building and timing as "
            f"the GPU run: {result['median_step_s'] * 1000:.1f} ms per step, "
            f"{result['seconds_per_frame'] * 1000:.2f} ms per output frame. "
            f"These numbers say nothing about a GPU. Command: `{cmd} --tiny-cpu`."
        )
    else:
        reading = (
            f"One section of the original model (25 steps, no step cache, batch 1, random bf16 weights) on "
            f"{result['device_name']} took {result['section_s']:.1f} s of transformer forwards, "
            f"{result['median_step_s']:.2f} s per step over {result['tokens']} latent tokens plus the packed "
            f"clean/history tokens; at {result['frames_per_section']} frames per section that is "
            f"**{result['seconds_per_frame']:.3f} s per output frame** (text/image encoding and VAE decoding "
            f"excluded; TeaCache would skip some steps). Command: `{cmd}`."
        )
    return head + "\n".join(rows) + "\n\n" + reading + "\n"


def main() -> None:
    tiny = {"action": "store_true", "help": "tiny config on CPU at 64 px (sanity check)"}
    bench_main(run, markdown, __doc__, "3 timed steps after 1 warm-up", {"--tiny-cpu": tiny})


if __name__ == "__main__":
    main()
