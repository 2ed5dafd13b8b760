"""The worker's speed options at full size on a CUDA GPU: one row per option and combination.

    python -m bench.bench_speed [--tiny-cpu] [--json OUT.json] [--md OUT.md] [--budget-s 420]

(also ``python -m bench.bench_gpu --only speed``; ``bash bench/device_run.sh`` runs it.)

Why: what a FramePack service costs is GPU time, and the options of
:mod:`diffusers_helper.speed` (compiled blocks, FP8 linears, the attention backend) and the
per-job step caches each change it.  The models are FramePack's real architectures with
random weights (``diffusers_helper.fullsize``); every row runs through the worker's own
code (``Models``, ``speed.apply``, ``generate``, ``warm_up``) at the 640 bucket.

Two kinds of row, in one run, side by side with eager bf16:

- **one transformer step** (the call of a first section at 640x608, its inputs captured
  from a real job): seconds, TFLOP/s achieved (the FLOPs counted once with
  ``torch.utils.flop_counter.FlopCounterMode``) and its share of the GPU's dense bf16 peak,
  compile seconds, peak memory, and the relative error of the output against eager bf16
  with the native attention (``|y - y_ref| / |y_ref|``);
- **whole jobs** (2 sections x 25 steps, text encoding to the final mp4): seconds per output
  frame and per step, transformer calls skipped, warm-up seconds, peak memory, and the
  PSNR of the decoded video against the eager job with the same seed.

Order matters, as on a worker: FP8 cannot be undone, so the bf16 rows and the eager
reference job run first.  Random weights say nothing about a cache's skip rate (first-block
cache: the first block's residual never settles) nor about any row's visual quality: those
columns are marked so.  ``--tiny-cpu`` runs every row's code with the tiny profile on CPU
(rows the CPU cannot run are reported as skipped with the reason).
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import bench_gpu
from bench.bench_gpu import PROMPT, SECONDS, STEPS, Budget, _sync, noise_image, phases
from diffusers_helper.fullsize import build_full

#: An H200's dense bf16 peak as measured here (8192^3 matmul, docs/benchmarks.md): the ceiling.
H200_BF16_TFLOPS = 790.0
#: A row counts as "close to eager bf16" when one step's relative error stays under this
#: (bf16 alone moves ~0.5 % between kernels; FP8 per-row quantization of random weights ~2 %):
#: what the defaults are chosen within.
CLOSE_REL_ERR = 0.05


def _peak_reset(cuda: bool) -> None:
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None


def capture_step_inputs(models: Any, image: Any, resolution: int) -> dict[str, Any]:
    """The keyword arguments of the first transformer call of a real one-section job."""
    from diffusers_helper.generate import OutputLayout, generate
    from diffusers_helper.params import JobParams, Variant

    transformer = models.transformer(Variant.FRAMEPACK)
    captured: dict[str, Any] = {}

    def grab(_module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not captured:
            captured.update({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with tempfile.TemporaryDirectory() as d:
            params = JobParams(prompt=PROMPT, seed=1, total_second_length=1.2, steps=1, cache="none",
                               resolution=resolution)  # fmt: skip
            generate(params, image, models=models, output=OutputLayout(Path(d)))
    finally:
        handle.remove()
    return captured


def count_flops(transformer: Any, inputs: dict[str, Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    return float(counter.get_total_flops())


def time_step(transformer: Any, inputs: dict[str, Any], repeat: int) -> tuple[float, float, torch.Tensor]:
    """(seconds of the first call, median seconds of ``repeat`` later calls, the output)."""
    with torch.no_grad():
        _sync()
        t = time.perf_counter()
        out = transformer(**inputs)[0]
        _sync()
        first = time.perf_counter() - t
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = transformer(**inputs)[0]
            _sync()
            times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((out.float() - ref.float()).norm() / ref.float().norm()), 5)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.shape != b.shape:
        return None
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return round(float(10 * np.log10(255.0**2 / mse)), 2) if mse > 0 else float("inf")


def uncompile(transformer: Any) -> None:
    """Undo :func:`diffusers_helper.speed.compile_blocks` (benchmark only: a worker never does)."""
    from diffusers_helper import speed

    for block in speed.blocks(transformer):
        block.__dict__.pop("forward", None)
        block.__dict__.pop("_framepack_compiled", None)
    transformer._framepack_speed = None
    torch._dynamo.reset()


def run(tiny_cpu: bool = False, budget_s: float = 420.0, json_out: str | None = None, md: str | None = None,
        repeat: int = 3, jobs_only: bool = False) -> dict[str, Any]:  # fmt: skip
    from diffusers_helper import speed
    from diffusers_helper.generate import OutputLayout, generate, warm_up
    from diffusers_helper.params import JobParams, Variant
    from diffusers_helper.profiles import Models, Placement, Profile, resolve_profile
    from diffusers_helper.video import read_mp4

    cuda = not tiny_cpu
    result: dict[str, Any] = {"benchmark": "speed", "tiny_cpu": tiny_cpu, "torch": torch.__version__,
                              "step_rows": [], "job_rows": [], "skipped": [], "errors": []}  # fmt: skip

    def save() -> None:
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2, default=str))
        if md:
            Path(md).write_text(markdown(result))

    if cuda and not torch.cuda.is_available():
        result["skipped_all"] = "no CUDA device (torch.cuda.is_available() is False)"
        save()
        return result
    budget = Budget(budget_s)

    phase = phases(result, budget, save, "skipped")

    # -- models ----------------------------------------------------------------------------
    if cuda:
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability()),
                         "memory_gb": round(props.total_memory / 2**30, 1)}  # fmt: skip
        shared, transformer = build_full("cuda", torch.bfloat16, torch.float16)
        placement = Placement("cuda", torch.bfloat16, torch.float16, low_vram=False)
        profile = Profile("full-size random", "(random)", "(random)", {Variant.FRAMEPACK: "(random)"}, 640,
                          is_noise=True, description="full-size architectures with random weights")  # fmt: skip
        models = Models(profile, placement, _shared=shared, _transformers={Variant.FRAMEPACK: transformer})
        resolution, image = 640, noise_image(640, 608, seed=3)
    else:
        models = Models(resolve_profile("tiny"), Placement("cpu", torch.float32, torch.float32))
        models.load_shared()
        transformer = models.transformer(Variant.FRAMEPACK)
        resolution, image = 64, noise_image(64, 64, seed=3)
    device = speed.Device.of(models.placement)
    backends = speed.available_attention(device.type)
    result["attention_available"] = backends
    seconds, steps = (SECONDS, STEPS) if cuda else (2.4, 4)

    # -- one transformer step ----------------------------------------------------------------
    inputs = None if jobs_only else phase("capture a first-section step's inputs", 20,
                                          lambda: capture_step_inputs(models, image, resolution))  # fmt: skip
    result["step_shape"] = {k: list(v.shape) for k, v in (inputs or {}).items() if torch.is_tensor(v) and v.ndim > 1}
    flops = phase("count FLOPs", 10, lambda: count_flops(transformer, inputs)) if inputs else None
    result["step_tflop"] = round(flops / 1e12, 2) if flops else None
    ref: dict[str, torch.Tensor] = {}

    def step_row(name: str, options: speed.SpeedOptions, compile_s: float | None = None) -> dict[str, Any]:
        _peak_reset(cuda)
        first, median, out = time_step(transformer, inputs, repeat)
        if not ref:
            ref["out"] = out.detach().clone()
        row = {"name": name, **options.public_dict(), "first_call_s": round(first, 3), "step_s": round(median, 4),
               "rel_err": rel_err(out, ref["out"]), "peak_gb": _peak(cuda)}  # fmt: skip
        if flops:
            row["tflops"] = round(flops / median / 1e12, 1)
            row["share_of_peak"] = round(row["tflops"] / H200_BF16_TFLOPS, 3) if cuda else None
        if compile_s is not None:
            row["compile_s"] = round(compile_s, 1)
        result["step_rows"].append(row)
        print(f"   {row}", flush=True)
        return row

    def set_backend(name: str) -> None:
        speed._quiet_attention_warning()
        transformer.set_attention_backend(name)

    # eager flex and math are reference implementations (seconds per call at this size): CPU only
    slow = ("flex", "_native_math") if cuda else ()
    order = ["native"] + [b for b in backends if b != "native" and b not in slow]
    for name in order if inputs else ():

        def eager_row(name: str = name) -> None:
            set_backend(name)
            step_row(f"eager, {name}", speed.SpeedOptions("off", "none", name))

        phase(f"step: eager bf16, attention {name}", 15, eager_row)
    eager_rows = [r for r in result["step_rows"] if r["rel_err"] <= CLOSE_REL_ERR]
    best = min(eager_rows, key=lambda r: r["step_s"])["attention"] if eager_rows else "native"
    result["fastest_attention"] = best
    set_backend("native")

    # -- the eager reference job (before anything irreversible) ------------------------------
    frames: dict[str, np.ndarray] = {}
    work = Path(tempfile.mkdtemp(prefix="fp-bench-speed-"))

    def job_row(name: str, cache: str = "none", reference: bool = False, warm_up_s: float | None = None
                ) -> dict[str, Any]:  # fmt: skip
        _peak_reset(cuda)
        params = JobParams(prompt=PROMPT, seed=1, total_second_length=seconds, steps=steps, cache=cache,
                           resolution=resolution)  # fmt: skip
        marks: list[tuple[int, float]] = []

        def on_event(e: Any) -> None:
            from diffusers_helper import events as ev

            if isinstance(e, ev.Progress):
                marks.append((e.section, time.perf_counter()))

        t = time.perf_counter()
        r = generate(params, image, on_event, models=models, output=OutputLayout(work / name.replace(" ", "_")))
        _sync()
        total = time.perf_counter() - t
        video = read_mp4(r.video)
        if reference:
            frames["ref"] = video
        step_s = [b - a for (sa, a), (sb, b) in zip(marks, marks[1:], strict=False) if sa == sb]
        row = {"name": name, **r.speed, "cache": r.cache_mode, "threshold": r.cache_threshold, "frames": r.frames,
               "total_s": round(total, 2), "s_per_frame": round(total / max(r.frames, 1), 4),
               "median_step_s": round(statistics.median(step_s), 4) if step_s else None,
               "transformer_calls": r.transformer_calls, "skipped": r.cache_skipped_steps,
               "outside_sampling_s": round(total - r.timings.get("sampling", 0), 2),
               "sampling_s": r.timings.get("sampling"), "peak_gb": _peak(cuda), "warm_up_s": warm_up_s,
               "psnr_vs_eager": None if reference or "ref" not in frames else psnr(video, frames["ref"])}  # fmt: skip
        result["job_rows"].append(row)
        last_job_s[0] = total
        print(f"   {row}", flush=True)
        return row

    last_job_s = [75.0 if cuda else 10.0]  # a job's need: the last one's time (eager is the slowest)

    def job_need() -> float:
        return last_job_s[0] * 1.1

    if not jobs_only:
        phase("job: eager bf16 (reference)", job_need(), lambda: job_row("eager bf16", reference=True))

    # -- compiled bf16 -----------------------------------------------------------------------
    def compiled(quant: str) -> None:
        set_backend(best)
        speed.compile_blocks(transformer)
        row = step_row(f"compiled{' + fp8' if quant == 'fp8' else ''}, {best}", speed.SpeedOptions("blocks", quant,
                       best))  # fmt: skip
        row["compile_s"] = row["first_call_s"]  # the first call compiles (in-memory caches were empty)

    if inputs:
        phase("step: compiled bf16", 120 if cuda else 90, lambda: compiled("none"))
        uncompile(transformer)

    # -- FP8 (cannot be undone) -----------------------------------------------------------------
    fp8_why = "not asked for (--jobs-only)" if jobs_only else speed.fp8_problem(device)
    if fp8_why:
        result["skipped"].append(f"fp8 rows: {fp8_why}")
        quant = "none"
    else:

        def fp8_eager() -> None:
            t = time.perf_counter()
            n = speed.quantize_fp8(transformer)
            result["fp8_linears"], result["quantize_s"] = n, round(time.perf_counter() - t, 2)
            set_backend(best)
            step_row(f"eager fp8, {best}", speed.SpeedOptions("off", "fp8", best))

        phase("step: eager fp8", 30, fp8_eager)
        quant = "fp8" if "fp8_linears" in result else "none"  # quantized: there is no way back
        if quant == "fp8":
            phase("step: compiled fp8", 120, lambda: compiled("fp8"))
            uncompile(transformer)

    # -- the default combination as a worker runs it: warm-up, then jobs -------------------------
    default = speed.SpeedOptions("blocks" if speed.compile_works(device.type) is None else "off", quant, best)
    result["default_measured"] = default.public_dict()

    def warm() -> float:
        uncompile(transformer)  # a fresh worker: nothing compiled in this process yet
        set_backend(best)
        if default.compile == "blocks":
            speed.compile_blocks(transformer)
        transformer._framepack_speed = models.speed = default  # (quantized above already)
        return warm_up(models, Variant.FRAMEPACK, work / "warm-up")

    warm_s = phase("warm-up (default options)", 90, warm)
    result["warm_up_s"] = round(warm_s, 1) if warm_s else None
    label = f"{'compiled' if default.compile == 'blocks' else 'eager'}{' + fp8' if quant == 'fp8' else ''}, {best}"
    phase("job: default, first after warm-up", job_need(), lambda: job_row(f"{label} (1st job)", warm_up_s=warm_s))
    phase("job: default, second", job_need(), lambda: job_row(f"{label} (2nd job)"))
    phase("job: default + MagCache", job_need(), lambda: job_row(f"{label} + MagCache", cache="mag"))
    phase("job: default + first-block cache", job_need(), lambda: job_row(f"{label} + first-block cache",
                                                                       cache="first_block"))  # fmt: skip
    save()
    return result


#: The last measurement on a GPU (merged JSON of the device runs), shown by ``make bench``
#: on machines without one.
MEASURED = Path(__file__).with_name("speed_results.json")


def stored_or(result: dict[str, Any]) -> dict[str, Any]:
    """``result``, or the stored GPU measurement when this machine skipped the benchmark."""
    return bench_gpu.stored_or(result, MEASURED, "skipped_all")


#: What the H200 run of 2026-12-04 showed, kept with its numbers (``markdown`` prints them
#: with the stored result).
FINDINGS = [
    "Compiled blocks (regional compilation, default inductor mode): one step 1.119 -> 0.888 s (450 -> 567 TFLOP/s, "
    "57 % -> 72 % of the 790 TFLOP/s bf16 peak), 18.8 s to compile cold; the whole job 0.865 -> 0.711 s per output "
    "frame (-18 %), warm-up 28.9 s before the worker says ready, no step skipped. This is `auto` on CUDA.",
    "FP8 (torchao, per-row float8 weights and activations on the 520 block linears): eager 1.268 s per step (slower "
    "than bf16: the activations' quantization runs as separate kernels), compiled 0.737 s (683 TFLOP/s counted "
    "at bf16's FLOPs, 86 % of the bf16 peak), relative error 2.0 %, peak 29.5 GB instead of 41.0 GB. But compiling "
    "the FP8 blocks took 237 s (bf16: 19 s), far over a 60 s warm-up, so FP8 stays opt-in (`FRAMEPACK_QUANT=fp8`).",
    "Attention backends through diffusers' dispatcher, eager: PyTorch's own choice (`native`, 1.119 s) beat cuDNN "
    "(1.146 s), flash (1.384 s) and memory-efficient (2.080 s); flash-attn, FA3 and sage are not installed there. "
    "`auto` keeps `native`.",
    "Target <= 0.55 s per output frame with no step skipped: not reached. Compiled bf16 gives 0.711; compiled FP8 "
    "would give about 0.61 by its step time (0.737 vs 0.888 s x 50 steps), not measured as a job. What is left "
    "outside the transformer are the VAE decodes, ~5.5 s per 73 frames (0.08 s/frame, measured 2026-11-29).",
    "Not measured (the device time ran out after the FP8 compile): the second job after warm-up, MagCache and the "
    "first-block cache as whole jobs. `python -m bench.bench_speed --jobs-only` measures them (~3 min on an H200).",
    "CUDA tests on the H200: test_high_vram_runs_on_the_gpu_in_bf16, test_preview_of_a_gpu_tensor_equals_the_cpu_"
    "preview, test_compiled_fp8_blocks_run_jobs_close_to_eager_and_refuse_loras (compile + FP8 on real CUDA) and "
    "test_speed_check_resolves_auto_on_this_gpu passed.",
]


def _f(v: Any, spec: str = "") -> str:
    return "–" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    head = "### Speed options: compiled blocks, FP8, attention backends, step caches\n\n"
    if "skipped_all" in result:
        return head + (
            f"Skipped: {result['skipped_all']}. Run `python -m bench.bench_speed` on a CUDA machine "
            "(`python -m bench.bench_speed --tiny-cpu` checks every row's code on CPU).\n"
        )
    gpu = result.get("gpu")
    where = f"{gpu['name']} (compute capability {'.'.join(map(str, gpu['capability']))})" if gpu else "CPU"
    cmd = "python -m bench.bench_speed" + (" --tiny-cpu" if result.get("tiny_cpu") else "")
    lines = [head, f"Command: `{cmd}` on {where}, torch {result['torch']}.\n"]
    if result.get("tiny_cpu"):
        lines.append("**CPU check of every row's code with the tiny profile: nothing here is about a GPU.**\n")
    available = ", ".join(result.get("attention_available", []))
    lines.append(f"One transformer step at a first section's shapes: {_f(result.get('step_tflop'))} TFLOP "
                 f"(FlopCounterMode). Attention backends that run here: {available}; fastest eager: "
                 f"`{result.get('fastest_attention')}`.\n")  # fmt: skip
    if result["step_rows"]:
        lines += ["| one step | compile | quant | attention | **s / step** | TFLOP/s | share of peak | compile s "
                  "| rel. error vs eager bf16 | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["step_rows"]:
            lines.append(f"| {r['name']} | {r['compile']} | {r['quant']} | {r['attention']} | **{r['step_s']:.3f}** "
                         f"| {_f(r.get('tflops'))} | {_f(r.get('share_of_peak'), '.0%')} "
                         f"| {_f(r.get('compile_s'), '.1f')} "
                         f"| {r['rel_err']:.2%} | {_f(r['peak_gb'])} |")  # fmt: skip
        lines.append("")
    if result["job_rows"]:
        lines += ["| whole job (2 sections x 25 steps) | cache | **s / output frame** | median s / step "
                  "| transformer calls (skipped)¹ | warm-up s | PSNR vs eager² | peak GB |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["job_rows"]:
            threshold = "" if r["threshold"] is None else f" {r['threshold']}"
            lines.append(f"| {r['name']} | {r['cache']}{threshold} "
                         f"| **{r['s_per_frame']:.3f}** | {_f(r['median_step_s'], '.3f')} "
                         f"| {r['transformer_calls']} ({r['skipped']}) | {_f(r.get('warm_up_s'), '.1f')} "
                         f"| {_f(r['psnr_vs_eager'])} | {_f(r['peak_gb'])} |")  # fmt: skip
        lines.append("\n¹ Random weights: the first-block cache's skips depend on the weights (its first block's "
                     "residual never settles on random ones), so its row measures its overhead only. MagCache's "
                     "skips follow its published ratios, not the weights, so its count is what real weights get; "
                     "its quality is not measured here.  ² Random weights: how far a video drifts says little "
                     "about how it looks; the step's relative error is the measure of closeness.\n")  # fmt: skip
    if result.get("warm_up_s") is not None:
        lines.append(f"Warm-up of the default options (`{result.get('default_measured')}`), compile caches "
                     f"cleared first: {result['warm_up_s']} s.\n")  # fmt: skip
    measured = result.get("measured")
    if measured:
        lines.append(
            f"Measured on {measured['date']} on a lent GPU machine, not in this run: "
            + "; ".join(f"`{c}`" for c in measured["commands"])
            + f" ({measured['note']}).\n"
        )
        lines += ["What it found:\n", *[f"- {f}" for f in FINDINGS], ""]
    for s in result.get("skipped", []):
        lines.append(f"- skipped: {s}")
    for e in result.get("errors", []):
        lines.append(f"- **failed** in {e['phase']}: `{e['error'][:300]}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--tiny-cpu", action="store_true", help="every row's code with the tiny profile on CPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip rows that would not finish in time")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per step row (median)")
    ap.add_argument("--jobs-only", action="store_true", help="only the default options' warm-up and jobs")
    args = ap.parse_args()
    print(markdown(run(**vars(args))))


if __name__ == "__main__":
    main()
