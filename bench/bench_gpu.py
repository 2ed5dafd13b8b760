"""FramePack at full size on a CUDA GPU, through the worker's own ``generate()`` path.

    python -m bench.bench_gpu [--smoke] [--tiny-cpu] [--json OUT.json] [--md OUT.md]
                              [--budget-s 450] [--card-gb 48]

Why: the real weights (~30 GB) cannot be downloaded where this runs, but the speed and the
memory of a GPU worker are set by the *architectures*, not the weights.  So this builds
every component of ``HunyuanVideoFramepackPipeline`` at FramePack's real size with random
weights, directly on the GPU (FramePack transformer 13 B in bf16: 24 heads x 128, 20 dual +
40 single blocks; Llama-3-8B text encoder, CLIP-L text encoder, SigLIP so400m image
encoder, the full HunyuanVideo VAE, all fp16), hands them to :class:`Models` as the worker
would hold them, and runs real jobs with :func:`diffusers_helper.generate.generate`:
a 640-bucket image (640x608), 2 sections x 25 steps, cfg 1, the original model.

Runs, in this order (each phase is skipped, with the reason, when the time budget would
not hold it; results are written after every phase, so a cut-off run still reports):

1. high-VRAM (everything resident), step cache off, then on (FramePack's TeaCache
   threshold; with random weights the skip rate says nothing about real videos);
2. low-VRAM on a simulated smaller card (``--card-gb``: the rest of the GPU is held by a
   ballast allocation so the driver reports that much free, as a smaller card would),
   ``gpu_memory_preservation`` 6 then 40 GB: with 48 GB free the 24 GB transformer fits
   under 6 GB of preservation (it stays resident) and not under 40 (its blocks stream);
   the text encoder streams in both;
3. model load: the transformer saved as sharded safetensors and loaded back through the
   worker's ``Models.transformer`` (``from_pretrained``), page cache dropped when allowed.

Reported per run: seconds per output frame, seconds per step, peak GPU memory (ballast
excluded), preview cost per step on GPU tensors, VAE decode seconds per section; and the
preview cost with the latent->RGB map on the GPU vs on the CPU.  FramePack's published
figures for an RTX 4090 (2.5 s/frame, 1.5 s/frame with TeaCache) are printed beside them.

``--tiny-cpu`` runs every phase's code with the tiny profile on CPU at 64 px (the
low-VRAM phases with the CPU as "GPU"), so the script is checked before device time is
spent on it; its numbers say nothing about a GPU.  Without CUDA (and without
``--tiny-cpu``) the benchmark reports itself skipped.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusers_helper.fullsize import build_full

#: FramePack's README: RTX 4090 desktop, 2.5 s/frame unoptimised, 1.5 s/frame with TeaCache.
FRAMEPACK_4090 = {"no_cache": 2.5, "teacache": 1.5}
#: 2 sections of 9 latent frames: round(2.4 s * 30 / 36) = 2.
SECONDS, STEPS = 2.4, 25
PROMPT = "The girl dances gracefully, with clear movements, full of charm."


@dataclass(frozen=True)
class RunSpec:
    key: str  # for --only
    name: str
    low_vram: bool
    use_teacache: bool
    preserve_gb: float = 6.0


HIGH_RUNS = (RunSpec("high", "high-VRAM", False, False), RunSpec("cache", "high-VRAM + step cache", False, True))
LOW_RUNS = (
    RunSpec("low6", "low-VRAM, preserve 6 GB", True, False, 6.0),
    RunSpec("low40", "low-VRAM, preserve 40 GB", True, False, 40.0),
)


# -- the models: diffusers_helper.fullsize (the random-full profile) builds them --------------
def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# -- measuring one job ----------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def _timed(target: Any, name: str, into: list[float]):
    """Wrap ``target.name`` so every call is timed (device synchronised on both sides)."""
    original = getattr(target, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _sync()
        t = time.perf_counter()
        out = original(*args, **kwargs)
        _sync()
        into.append(time.perf_counter() - t)
        return out

    setattr(target, name, wrapper)
    try:
        yield
    finally:
        setattr(target, name, original)


def run_job(models: Any, spec: RunSpec, image: Any, out: Path, seconds: float, steps: int) -> dict[str, Any]:
    """One job through ``generate()``; the numbers a worker operator asks for."""
    from diffusers import AutoencoderKLHunyuanVideo

    from diffusers_helper import events as ev
    from diffusers_helper import generate as gen
    from diffusers_helper.params import JobParams

    params = JobParams(prompt=PROMPT, seed=1, total_second_length=seconds, steps=steps, use_teacache=spec.use_teacache,
                       gpu_memory_preservation=spec.preserve_gb, resolution=640 if models.placement.device == "cuda"
                       else 64)  # fmt: skip
    previews: list[float] = []
    decodes: list[float] = []
    step_marks: list[tuple[int, float]] = []

    def on_event(e: Any) -> None:
        if isinstance(e, ev.Progress):
            step_marks.append((e.section, time.perf_counter()))

    cuda = models.placement.device == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with _timed(gen, "make_preview", previews), _timed(AutoencoderKLHunyuanVideo, "decode", decodes):
        t = time.perf_counter()
        result = gen.generate(params, image, on_event, models=models, output=gen.OutputLayout(out))
        _sync()
        total = time.perf_counter() - t
    steps_s = [b - a for (sa, a), (sb, b) in zip(step_marks, step_marks[1:], strict=False) if sa == sb]
    transformer = models.transformer(params.model)
    streamed = bool(getattr(transformer, "_framepack_group_offload", False))
    text_streamed = bool(getattr(models.load_shared()["text_encoder"], "_framepack_group_offload", False))
    placement_s = result.timings.get("load", 0.0)  # building the pipeline: moves and pinning happen here
    return {
        "name": spec.name,
        "low_vram": spec.low_vram,
        "step_cache": spec.use_teacache,
        "gpu_memory_preservation": spec.preserve_gb,
        "transformer_placement": "streamed (group offload)" if streamed else "resident",
        "text_encoder_streamed": text_streamed,
        "status": result.status,
        "size": f"{result.height}x{result.width}",
        "sections": result.sections,
        "steps": steps,
        "frames": result.frames,
        "total_s": round(total, 3),
        "timings": result.timings,
        "placement_s": round(placement_s, 3),
        "seconds_per_frame": round((total - placement_s) / max(result.frames, 1), 4),
        "sampling_seconds_per_frame": round(result.timings.get("sampling", 0) / max(result.frames, 1), 4),
        "median_step_s": round(statistics.median(steps_s), 4) if steps_s else None,
        "mean_step_s": round(statistics.fmean(steps_s), 4) if steps_s else None,
        "transformer_calls": result.transformer_calls,
        "cache_skipped_steps": result.cache_skipped_steps,
        "preview_ms_median": round(statistics.median(previews) * 1000, 3) if previews else None,
        "previews": len(previews),
        "vae_decode_s": [round(x, 3) for x in decodes],
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def preview_cost(device: str, repeat: int) -> dict[str, Any]:
    """The preview of one 640-bucket section (9 x 80 x 76 latents): map on the device vs on the CPU."""
    from diffusers_helper.preview import LatentToRGB, make_preview

    mapper = LatentToRGB(16)
    h, w = (80, 76) if device == "cuda" else (8, 8)
    x0 = torch.randn(1, 16, 9, h, w, device=device)

    def median_ms(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeat):
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            times.append((time.perf_counter() - t) * 1000)
        return round(statistics.median(times), 3)

    return {
        "latents": [9, h, w],
        "on_device_ms": median_ms(lambda: make_preview(x0, mapper)),
        "via_cpu_ms": median_ms(lambda: make_preview(x0.cpu(), mapper)),
    }


def noise_image(height: int, width: int, seed: int = 0) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


# -- the phases -----------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def phases(result: dict[str, Any], budget: Budget, save: Any, skipped_key: str) -> Any:
    """``phase(name, needs_s, fn)``: run ``fn`` if the budget still holds ``needs_s``, else
    record it as skipped; an exception is recorded (later phases may still run); the result
    is saved after each, so a cut-off run still reports."""

    def phase(name: str, needs_s: float, fn: Any) -> Any:
        if budget.left() < needs_s:
            result[skipped_key].append(f"{name}: {budget.left():.0f} s left, needs ~{needs_s:.0f} s")
            save()
            return None
        print(f"== {name} ({budget.left():.0f} s left)", flush=True)
        t = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 — report it; later phases may still run
            result["errors"].append({"phase": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                     "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
            print(traceback.format_exc(), flush=True)
            return None
        finally:
            print(f"   {time.perf_counter() - t:.1f} s", flush=True)
            save()

    return phase


def _ballast_to(free_gb: float) -> Any:
    """Hold GPU memory so the driver reports about ``free_gb`` free (a smaller card)."""
    gc.collect()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    take = max(0, free - int(free_gb * 2**30))
    return torch.empty(take, dtype=torch.uint8, device="cuda") if take else None


def _drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=False, timeout=60)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure_load(transformer: Any, placement: Any, work: Path) -> dict[str, Any]:
    """Save the transformer as the real repo ships it (sharded safetensors) and load it back
    through ``Models.transformer``, the call a worker makes at start."""
    from diffusers_helper.params import Variant
    from diffusers_helper.profiles import Models, Profile

    target = work / "framepack"
    t = time.perf_counter()
    transformer.save_pretrained(target, max_shard_size="5GB")
    save_s = time.perf_counter() - t
    size_gb = sum(f.stat().st_size for f in target.iterdir()) / 2**30
    dropped = _drop_page_cache()
    profile = Profile("saved", str(work), str(work), {Variant.FRAMEPACK: str(target)}, 640)
    models = Models(profile, placement)
    t = time.perf_counter()
    loaded = models.transformer(Variant.FRAMEPACK)
    _sync()
    load_s = time.perf_counter() - t
    device = str(next(loaded.parameters()).device)
    del loaded, models
    shutil.rmtree(target, ignore_errors=True)
    return {"save_s": round(save_s, 2), "load_s": round(load_s, 2), "size_gb": round(size_gb, 2),
            "page_cache_dropped": dropped, "loaded_to": device}  # fmt: skip


#: The last measurement on a GPU (merged JSON of the device runs), shown by ``make bench``
#: on machines without one.
MEASURED = Path(__file__).with_name("gpu_results.json")


def stored_or(result: dict[str, Any], measured: Path = MEASURED, skipped_key: str = "skipped") -> dict[str, Any]:
    """``result``, or the stored GPU measurement when this machine skipped the benchmark."""
    if skipped_key in result and measured.exists():
        return {**json.loads(measured.read_text()), "skipped_here": result[skipped_key]}
    return result


def run(smoke: bool = False, tiny_cpu: bool = False, budget_s: float = 450.0, card_gb: float = 48.0,
        md: str | None = None, json_out: str | None = None, only: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Every phase in order; ``md``/``json_out`` are rewritten after each one."""
    from diffusers_helper.params import Variant
    from diffusers_helper.profiles import Models, Placement, Profile, resolve_profile

    result: dict[str, Any] = {"benchmark": "gpu", "smoke": smoke, "tiny_cpu": tiny_cpu, "torch": torch.__version__,
                              "runs": [], "skipped_phases": [], "errors": []}  # fmt: skip

    def save() -> None:
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2, default=str))
        if md:
            Path(md).write_text(markdown(result))

    if not tiny_cpu and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU visible to torch"
        result["skipped"] = f"no CUDA device: torch.cuda.is_available() is False ({why}, torch {torch.__version__})"
        save()
        return result

    budget = Budget(budget_s)
    seconds, steps = (1.2, 2) if smoke else (SECONDS, STEPS)
    device = "cpu" if tiny_cpu else "cuda"
    work = Path(tempfile.mkdtemp(prefix="fp-bench-gpu-"))
    try:  # the harness needs the web stack's packages, which a bare GPU machine may lack
        from bench.harness import machine_facts

        result["machine"] = machine_facts()
    except ImportError:
        result["machine"] = {}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                         "driver_free_gb": round(torch.cuda.mem_get_info()[0] / 2**30, 1)}  # fmt: skip
    image = noise_image(640, 608, seed=3) if device == "cuda" else noise_image(64, 64, seed=3)

    phase = phases(result, budget, save, "skipped_phases")

    try:
        # 1. The models, as a worker holds them after loading.
        def build() -> Any:
            t = time.perf_counter()
            if tiny_cpu:
                models = Models(resolve_profile("tiny"), Placement.detect())
                models.load_shared()
                models.transformer(Variant.FRAMEPACK)
                result["models"] = {"source": "tiny profile from disk (from_pretrained)"}
            else:
                shared, transformer = build_full("cuda", torch.bfloat16, torch.float16)
                placement = Placement("cuda", torch.bfloat16, torch.float16, low_vram=False)
                profile = Profile("full-size random", "(random)", "(random)", {Variant.FRAMEPACK: "(random)"}, 640,
                                  is_noise=True, description="full-size architectures with random weights")  # fmt: skip
                models = Models(profile, placement, _shared=shared, _transformers={Variant.FRAMEPACK: transformer})
                result["models"] = {
                    "source": "built on the GPU with random weights",
                    "parameters": {k: _params(shared[k]) for k in ("text_encoder", "text_encoder_2", "image_encoder",
                                                                   "vae")} | {"transformer": _params(transformer)},
                    "resident_gb": round(torch.cuda.memory_allocated() / 2**30, 2),
                }  # fmt: skip
            _sync()
            result["models"]["build_s"] = round(time.perf_counter() - t, 2)
            return models

        models = phase("build models", 60, build)
        if models is None:
            return result
        result["preview"] = phase("preview cost", 20, lambda: preview_cost(device, 10 if smoke else 100))

        # 2. High-VRAM jobs.
        first_s = None
        wanted = set(only.split(",")) if only else {"high", "cache", "low6", "low40", "load"}
        for spec in [r for r in HIGH_RUNS if r.key in wanted]:
            need = 30 if first_s is None else first_s * 1.2
            r = phase(spec.name, need, lambda spec=spec: run_job(models, spec, image, work / "out", seconds, steps))
            if r is not None:
                result["runs"].append(r)
                first_s = first_s or r["total_s"]

        # 3. Low-VRAM jobs on a simulated smaller card.
        def go_low() -> Any:
            for name in ("text_encoder", "text_encoder_2", "image_encoder", "vae"):
                models._shared[name].to("cpu")
            models._transformers[Variant.FRAMEPACK].to("cpu")
            if device == "cuda":
                ballast = _ballast_to(card_gb)
                free = Placement.free_gb_now()
                models.placement = Placement("cuda", torch.bfloat16, torch.float16, low_vram=True, free_gb=free)
                result["low_vram_card"] = {"simulated_card_gb": card_gb, "driver_free_gb": round(free, 2),
                                           "ballast_gb": round((ballast.numel() if ballast is not None else 0) / 2**30,
                                                               2)}  # fmt: skip
                return ballast
            models.placement = Placement("cpu", torch.float32, torch.float32, low_vram=True)
            return None

        low_need = (first_s or 30) * 2.5 if wanted & {"low6", "low40"} else float("inf")
        ballast = phase("move to CPU, simulate a smaller card", low_need, go_low) if budget.left() > low_need else None
        if "low_vram_card" in result or (tiny_cpu and models.placement.low_vram):
            ballast_gb = (ballast.numel() / 2**30) if ballast is not None else 0.0
            for spec in [r for r in LOW_RUNS if r.key in wanted]:
                if tiny_cpu and spec.preserve_gb > 6:  # on CPU, force the group-offload path
                    models.placement.group_offload = True
                r = phase(spec.name, (first_s or 30) * 2.0,
                          lambda spec=spec: run_job(models, spec, image, work / "out", seconds, steps))  # fmt: skip
                if r is not None:
                    if r["peak_gpu_gb"] is not None:
                        r["peak_gpu_gb"] = round(r["peak_gpu_gb"] - ballast_gb, 2)
                        r["fits_preservation"] = r["peak_gpu_gb"] <= card_gb - spec.preserve_gb
                    result["runs"].append(r)
        else:
            result["skipped_phases"].append("low-VRAM runs: not enough time left")
        del ballast
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

        # 4. Model load through from_pretrained.
        placement = Placement.detect() if device == "cuda" else Placement("cpu", torch.float32, torch.float32)
        if device == "cuda":
            placement.low_vram = False  # load straight to the GPU, as a worker with room does
        result["load"] = (
            None
            if "load" not in wanted
            else phase(
                "model load (transformer)",
                90 if device == "cuda" else 5,
                lambda: measure_load(models.transformer(Variant.FRAMEPACK), placement, work),
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        save()
    return result


# -- report ---------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = "") -> str:
    return "–" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    head = "### GPU: FramePack at full size through `generate()`\n\n"
    cmd = "python -m bench.bench_gpu"
    if "skipped" in result:
        return head + (
            f"Skipped: {result['skipped']}. Nothing was measured on this machine. Run `{cmd} --json gpu.json "
            f"--md gpu.md` on a CUDA machine with ~80 GB of GPU memory (random weights, nothing to download); "
            f"`{cmd} --tiny-cpu` runs every phase's code with the tiny profile on CPU.\n"
        )
    lines = [head]
    gpu = result.get("gpu")
    where = f"{gpu['name']} ({gpu['memory_gb']} GiB)" if gpu else f"CPU ({result.get('machine', {}).get('cpu')})"
    lines.append(f"Command: `{cmd}{' --tiny-cpu' if result.get('tiny_cpu') else ''}"
                 f"{' --smoke' if result.get('smoke') else ''}`, on {where}, torch {result['torch']}.\n")  # fmt: skip
    measured = result.get("measured")
    if measured:
        cmds = "; ".join(f"`{c}`" for c in measured["commands"])
        lines.append(f"Measured on {measured['date']} on a lent GPU machine, not in this run ({cmds}). "
                     f"{measured['code']}.\n")  # fmt: skip
    if result.get("tiny_cpu"):
        lines.append("**CPU sanity check with the tiny profile: these numbers say nothing about a GPU.**\n")
    m = result.get("models") or {}
    if m.get("parameters"):
        parts = ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in m["parameters"].items())
        lines.append(f"Models: {m['source']} in {m['build_s']} s ({parts}; {m['resident_gb']} GB resident).\n")
    elif m:
        lines.append(f"Models: {m['source']}, loaded in {m.get('build_s')} s.\n")
    if result["runs"]:
        lines += [
            "| run | transformer | text encoder | step cache | frames | **s / output frame** | sampling s / frame "
            "| median s / step | transformer calls (skipped) | VAE decode s per section | preview ms / step "
            "| peak GPU GB | placement s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["runs"]:
            vae = ", ".join(f"{x:.2f}" for x in r["vae_decode_s"])
            te = "streamed" if r.get("text_encoder_streamed") else ("moved while it runs" if r["low_vram"] else
                                                                       "resident")  # fmt: skip
            lines.append(
                f"| {r['name']} | {r['transformer_placement']} | {te} | {'on' if r['step_cache'] else 'off'} "
                f"| {r['frames']} "
                f"| **{r['seconds_per_frame']:.3f}** | {r['sampling_seconds_per_frame']:.3f} "
                f"| {_fmt(r['median_step_s'], '.3f')} | {r['transformer_calls']} ({r['cache_skipped_steps']}) "
                f"| {vae} | {_fmt(r['preview_ms_median'], '.2f')} | {_fmt(r['peak_gpu_gb'])} "
                f"| {_fmt(r.get('placement_s'), '.1f')} |"
            )
        lines.append(
            f"\nFramePack's own figures (README, RTX 4090 desktop): **{FRAMEPACK_4090['no_cache']} s/frame**, "
            f"**{FRAMEPACK_4090['teacache']} s/frame** with TeaCache. Ours: each job is {SECONDS} s at the 640 "
            f"bucket = 2 sections x {STEPS} steps, timed from `generate()` call to the final mp4 (text encoding, "
            "VAE encode/decode, previews, section and final mp4 writes included; model loading and the "
            "one-time placement — moves to the GPU, pinning for streaming — excluded and shown apart), divided by "
            "the frames produced. Random weights: the step cache's skip rate (and so its speed-up) is not "
            "what real weights give.\n"
        )
    card = result.get("low_vram_card")
    if card:
        lines.append(
            f"Low-VRAM runs: a ballast allocation left the driver reporting {card['driver_free_gb']} GB free (a "
            f"simulated {card['simulated_card_gb']:g} GB card); peak GPU memory excludes the ballast. "
            + "; ".join(
                f"{r['name']}: peak {r['peak_gpu_gb']} GB, within card minus preservation: {r.get('fits_preservation')}"
                for r in result["runs"]
                if r["low_vram"]
            )  # fmt: skip
            + ".\n"
        )
    p = result.get("preview")
    if p:
        lines.append(
            f"Preview of one section ({'x'.join(map(str, p['latents']))} latents → JPEG strip): "
            f"{p['on_device_ms']} ms with the latent→RGB map on the {'GPU' if gpu else 'CPU'}, "
            f"{p['via_cpu_ms']} ms copying the latents to the CPU first.\n"
        )
    load = result.get("load")
    if load:
        lines.append(
            f"Model load: the transformer saved as sharded safetensors ({load['size_gb']} GB, {load['save_s']} s) "
            f"loaded through `Models.transformer` (`from_pretrained`) to {load['loaded_to']} in "
            f"**{load['load_s']} s** (page cache {'dropped first' if load['page_cache_dropped'] else 'NOT dropped'}).\n"
        )
    if result.get("findings"):
        lines.append("What this run found:\n")
        lines += [f"- {f}" for f in result["findings"]]
        lines.append("")
    for s in result.get("skipped_phases", []):
        lines.append(f"- skipped: {s}")
    for e in result.get("errors", []):
        lines.append(f"- **failed** in {e['phase']}: `{e['error']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1 section x 2 steps (a check, not a measurement)")
    ap.add_argument("--tiny-cpu", action="store_true", help="every phase with the tiny profile on CPU")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip phases that would not finish in time")
    ap.add_argument("--card-gb", type=float, default=48.0, help="free GPU memory of the simulated low-VRAM card")
    ap.add_argument("--json", dest="json_out", default=None, help="write the raw result here")
    ap.add_argument("--only", default=None, help="comma-separated: high,cache,low6,low40,load")
    ap.add_argument("--md", default=None, help="write the markdown section here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(markdown(run(**vars(args))))


if __name__ == "__main__":
    main()
