"""Worker speed options (compiled blocks, FP8, attention backend) and the per-job step caches,
on CPU: every option validated and reported, impossible combinations refused in one line,
compiled blocks giving eager's frames, both caches skipping when they must.  The CUDA
side (FP8, compile on a GPU) is in tests/test_cuda.py; the speed is in bench/bench_speed.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import redis
import torch

from diffusers_helper import speed
from diffusers_helper.params import CacheMode, JobParams, Variant
from diffusers_helper.speed import EAGER, Device, SpeedOptionError, SpeedOptions
from tasks.protocol import Keys
from tasks.settings import Settings

from .conftest import noise_image, png_bytes

CPU = Device("cpu")
H100 = Device("cuda", (9, 0))


# -- options: validated, resolved, refused (fast) --------------------------------------------------
@pytest.mark.parametrize("name, value", [("FRAMEPACK_COMPILE", "max"), ("FRAMEPACK_QUANT", "int4")])
def test_settings_refuse_unknown_speed_values_naming_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})
    assert Settings.from_env({}).speed == SpeedOptions("auto", "auto", "auto")


def test_auto_is_everything_off_on_a_cpu():
    assert speed.resolve(SpeedOptions(), CPU) == EAGER
    speed.check(EAGER, CPU)  # and it is honoured


@pytest.mark.parametrize("options, device, says", [
    (SpeedOptions("off", "fp8", "native"), CPU, "FRAMEPACK_QUANT=fp8: FP8 needs a CUDA GPU"),
    (SpeedOptions("off", "fp8", "native"), Device("cuda", (8, 6)), "compute capability 8.9 or newer; this GPU has 8.6"),
    (SpeedOptions("off", "fp8", "native"), Device("cuda", (9, 0), low_vram=True), "low-VRAM mode"),
    (SpeedOptions("off", "none", "sdpa"), CPU, "FRAMEPACK_ATTENTION='sdpa' is unknown; available here: native"),
    (SpeedOptions("off", "none", "_native_cudnn"), CPU, "FRAMEPACK_ATTENTION='_native_cudnn' does not run here"),
    (SpeedOptions("off", "none", "sage"), CPU, "FRAMEPACK_ATTENTION='sage' does not run here"),
    (SpeedOptions("jit", "none", "native"), CPU, "FRAMEPACK_COMPILE='jit'"),
])  # fmt: skip
def test_options_the_machine_cannot_honour_are_refused_in_one_line(options, device, says):
    with pytest.raises(SpeedOptionError) as err:
        speed.check(options, device)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_available_attention_backends_are_the_ones_that_run():
    available = speed.available_attention("cpu")
    assert available[0] == "native" and "_native_cudnn" not in available
    q = torch.randn(1, 64, 2, 64)
    for name in available:  # each really computes attention here
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        assert torch.allclose(dispatch_attention_fn(q, q, q, backend=name), dispatch_attention_fn(q, q, q), atol=1e-4)


def test_auto_on_a_gpu_machine_compiles_blocks_and_keeps_fp8_opt_in(monkeypatch):
    monkeypatch.setattr(speed, "compile_works", lambda _device: None)
    monkeypatch.setattr(speed, "attention_works", lambda _name, _device: None)
    assert speed.resolve(SpeedOptions(), H100) == SpeedOptions("blocks", "none", "native")
    assert speed.resolve(SpeedOptions(quant="fp8"), H100).quant == "fp8"  # explicit stays


def test_the_cache_follows_use_teacache_unless_given():
    assert JobParams().cache_mode is CacheMode.FIRST_BLOCK and JobParams().cache_threshold_or_default == 0.15
    assert JobParams(use_teacache=False).cache_mode is CacheMode.NONE
    assert JobParams(use_teacache=False).cache_threshold_or_default is None
    mag = JobParams(cache="mag")
    assert mag.cache_mode is CacheMode.MAG and mag.cache_threshold_or_default == 0.1
    assert JobParams(cache="none", use_teacache=True).cache_mode is CacheMode.NONE
    assert JobParams(cache="mag", cache_threshold=0.3).cache_threshold_or_default == 0.3


@pytest.mark.parametrize("body, field", [({"cache": "tea"}, "cache"), ({"cache_threshold": 0}, "cache_threshold"),
                                         ({"cache_threshold": 1.5}, "cache_threshold")])  # fmt: skip
def test_bad_cache_parameters_are_refused_at_submit(settings, body, field):
    from webapp import create_app

    client = create_app({"SETTINGS": settings, "SWEEPER": False}).test_client()
    resp = client.post("/api/jobs", data={"image": (__import__("io").BytesIO(png_bytes()), "i.png"),
                                          **{k: str(v) for k, v in body.items()}})  # fmt: skip
    assert resp.status_code == 422 and field in {e["field"] for e in resp.json["errors"]}, resp.json


def _worker_record(r: redis.Redis, name: str, quant: str) -> None:
    options = {"compile": "blocks", "quant": quant, "attention": "native", "warm_up_seconds": 30.0}
    record = {"name": name, "queues": ["gpu"], "ready": True, "warming": False, "speed": options}
    r.set(Keys.worker(name), json.dumps(record), ex=60)
    r.zadd(Keys.WORKERS, {name: time.time()})


def test_loras_are_refused_at_submit_when_every_worker_runs_fp8(settings, tmp_path):
    import dataclasses
    import io

    from webapp import create_app

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(lora_dir / "style.safetensors"))
    s = dataclasses.replace(settings, lora_dir=lora_dir)
    client = create_app({"SETTINGS": s, "SWEEPER": False}).test_client()
    r = redis.Redis.from_url(settings.store_url)
    _worker_record(r, "h:1", "fp8")

    def submit():
        return client.post("/api/jobs", data={"image": (io.BytesIO(png_bytes()), "i.png"), "loras": "style:0.8",
                                              "steps": "1", "total_second_length": "1"})  # fmt: skip

    refused = submit()
    assert refused.status_code == 422, refused.json
    assert refused.json["errors"][0]["field"] == "loras" and "FP8" in refused.json["errors"][0]["message"]
    _worker_record(r, "h:2", "none")  # one worker can run it: accepted (it will go where it can run)
    assert submit().status_code == 202


def test_readyz_says_a_worker_is_warming_up(settings):
    from webapp import create_app

    client = create_app({"SETTINGS": settings, "SWEEPER": False}).test_client()
    r = redis.Redis.from_url(settings.store_url)
    options = {"compile": "blocks", "quant": "none", "attention": "native", "warm_up_seconds": None}
    record = {"name": "h:1", "queues": ["gpu"], "ready": False, "warming": True, "speed": options}
    r.set(Keys.worker("h:1"), json.dumps(record), ex=60)
    r.zadd(Keys.WORKERS, {"h:1": time.time()})
    resp = client.get("/readyz")
    assert resp.status_code == 503 and "warming up" in resp.json["reason"] and "compile=blocks" in resp.json["reason"]


# -- on the tiny model (slow: runs the pipeline) ------------------------------------------------------
def _job(models, tmp_path, name, **kw):
    from diffusers_helper.generate import OutputLayout, generate

    threshold = kw.pop("cache_threshold_override", None)
    params = JobParams(**{"prompt": "a cat", "total_second_length": 2, "steps": 8, "seed": 4, "cache": "none", **kw})
    return generate(params, noise_image(64, 64), models=models, output=OutputLayout(tmp_path / name),
                    cache_threshold=threshold)  # fmt: skip


def _fresh_models(tiny_dir):
    from diffusers_helper.profiles import Models, Placement, resolve_profile

    return Models(resolve_profile("tiny", cache_dir=tiny_dir), Placement("cpu", torch.float32, torch.float32))


@pytest.mark.slow
def test_both_caches_skip_calls_when_they_must_and_record_it(tiny_models, tmp_path):
    none = _job(tiny_models, tmp_path, "none")
    assert (none.transformer_calls, none.cache_skipped_steps, none.cache_mode) == (16, 0, "none")
    # MagCache at its default threshold skips on FramePack's published ratios (retention: never in step 1-2)
    mag = _job(tiny_models, tmp_path, "mag", cache="mag")
    assert mag.transformer_calls == 16 and 0 < mag.cache_skipped_steps < 16
    sidecar = json.loads(mag.sidecar.read_text())
    assert sidecar["cache"] == {"mode": "mag", "threshold": 0.1, "enabled": True, "transformer_calls": 16,
                                "skipped_steps": mag.cache_skipped_steps}  # fmt: skip
    assert sidecar["speed"] == EAGER.public_dict()
    # a lower threshold skips less; the first-block cache with an unreachable bar skips every step it may
    assert _job(tiny_models, tmp_path, "mag-less", cache="mag", cache_threshold=0.01).cache_skipped_steps < (
        mag.cache_skipped_steps)
    first = _job(tiny_models, tmp_path, "fbc", cache="first_block", cache_threshold_override=1e9)
    assert first.cache_mode == "first_block" and first.cache_skipped_steps == 16 - 2  # the first step of each section
    # real CFG: each call has its own cache state, both counted
    cfg = _job(tiny_models, tmp_path, "cfg", cache="mag", cfg=2.0)
    assert cfg.transformer_calls == 32 and cfg.cache_skipped_steps == 2 * mag.cache_skipped_steps


@pytest.mark.slow
def test_compiled_blocks_stay_compiled_under_the_step_caches(tiny_dir, tmp_path):
    """The caches' hooks wrap a block's ``forward``: with the compiled ``forward`` inside them,
    every block that computes runs compiled code (a counting backend sees each call)."""
    graph_calls = [0]

    def counting(gm, _inputs):
        def run(*args):
            graph_calls[0] += 1
            return gm.forward(*args)

        return run

    models = _fresh_models(tiny_dir)
    transformer = models.transformer(Variant.FRAMEPACK)
    speed.apply(transformer, SpeedOptions("blocks", "none", "native"), backend=counting)
    n_blocks = len(speed.blocks(transformer))
    plain = _job(models, tmp_path, "plain")
    assert graph_calls[0] == plain.transformer_calls * n_blocks
    graph_calls[0] = 0
    cached = _job(models, tmp_path, "cached", cache="first_block", cache_threshold_override=1e9)
    computed = cached.transformer_calls - cached.cache_skipped_steps
    # the first block runs every call; the others only when the call is computed
    assert graph_calls[0] == cached.transformer_calls + computed * (n_blocks - 1)
    assert cached.speed == {"compile": "blocks", "quant": "none", "attention": "native"}


@pytest.mark.slow
def test_compiled_blocks_give_the_frames_of_eager(tiny_dir, tmp_path):
    why = speed.compile_works("cpu")
    if why is not None:  # then the option is refused here, with that reason
        with pytest.raises(SpeedOptionError, match="torch.compile cannot compile on this machine"):
            speed.check(SpeedOptions("blocks", "none", "native"), CPU)
        pytest.skip(f"inductor cannot compile on this machine: {why}")
    from diffusers_helper.video import read_mp4

    eager = _job(_fresh_models(tiny_dir), tmp_path, "eager", prompt="[0s: a cat] [1.2s: a cat jumps over a wall]")
    models = _fresh_models(tiny_dir)
    models.load_shared()
    assert models.set_speed(SpeedOptions("blocks", "auto", "auto")) == SpeedOptions("blocks", "none", "native")
    compiled = _job(models, tmp_path, "compiled", prompt="[0s: a cat] [1.2s: a cat jumps over a wall]")
    from diffusers_helper import checkpoint

    a, b = read_mp4(eager.video).astype(int), read_mp4(compiled.video).astype(int)
    diff = np.abs(a - b)
    psnr = 10 * np.log10(255**2 / max(float((diff**2).mean()), 1e-12))
    print(f"frames: mean |diff| {diff.mean():.4f}, 99.9th percentile {np.percentile(diff, 99.9)}, max {diff.max()}, "
          f"PSNR {psnr:.1f} dB")  # fmt: skip
    latents_a = checkpoint.load(tmp_path / "eager" / "video-checkpoint.safetensors")[0]["timeline"]
    latents_b = checkpoint.load(tmp_path / "compiled" / "video-checkpoint.safetensors")[0]["timeline"]
    print(f"latents: relative error {float((latents_a - latents_b).norm() / latents_a.norm()):.2e}")
    # float32 on CPU: inductor reorders sums; over 16 steps the latents differ by ~1e-7 (measured 6.6e-8):
    # that is the check of compiled against eager.  The mp4s then differ by what H.264 at CRF 16 makes
    # of such inputs: a flipped decision spreads through its group of pictures (measured with PyAV 18.1's
    # libx264: mean 0.23 of 255, max 27 levels on a few pixels, PSNR 47.2 dB; an earlier build: mean
    # 0.02), so the frames are held to the same picture within 40 dB, the latents to 1e-5.
    assert float((latents_a - latents_b).norm() / latents_a.norm()) < 1e-5
    assert a.shape == b.shape and diff.mean() < 1.0 and psnr > 40
    assert compiled.speed["compile"] == "blocks"


@pytest.mark.slow
def test_calibration_writes_ratios_a_worker_reads(tiny_dir, tmp_path, monkeypatch):
    from diffusers_helper import cli
    from tasks.worker import _mag_ratios

    monkeypatch.setenv("FRAMEPACK_CACHE", str(tiny_dir.parent))
    picture = tmp_path / "in.png"
    noise_image(64, 64).save(picture)
    out = tmp_path / "ratios.json"
    for model in ("framepack", "framepack-f1"):
        assert cli.main(["calibrate", str(picture), "--model", model, "--steps", "6", "--seconds", "2",
                         "-o", str(out)]) == 0  # fmt: skip
    ratios = _mag_ratios(str(out))
    assert set(ratios) == {"framepack", "framepack-f1"}
    assert all(len(r) == 6 and r[0] == 1.0 and all(x > 0 for x in r) for r in ratios.values())
    assert ratios["framepack"] != ratios["framepack-f1"]  # measured, not copied


@pytest.mark.slow
def test_a_worker_with_options_it_cannot_honour_does_not_start(tmp_path, valkey_url):
    from stack import ROOT, stack_env, worker_command

    env = stack_env(valkey_url, tmp_path / "results", {"FRAMEPACK_QUANT": "fp8"})
    t = time.monotonic()
    done = subprocess.run(worker_command(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode != 0 and time.monotonic() - t < 120
    lines = [x for x in (done.stdout + done.stderr).splitlines() if "cannot start" in x]
    assert lines and "FRAMEPACK_QUANT=fp8: FP8 needs a CUDA GPU" in lines[-1], done.stderr[-2000:]
    assert sys.executable  # (the same interpreter ran the check)
