"""The CUDA path, on a real GPU: bf16 placement, low-VRAM offloading, group offload with the
step cache, previews of GPU tensors.  Skipped (with the reason) where CUDA is absent; the
full-size numbers come from ``python -m bench.bench_gpu``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_helper import events as ev
from diffusers_helper.generate import OutputLayout, generate
from diffusers_helper.params import JobParams, Variant
from diffusers_helper.preview import LatentToRGB, make_preview
from diffusers_helper.profiles import Models, Placement, resolve_profile
from diffusers_helper.sections import output_frames, section_count

from .conftest import noise_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def _models(tiny_dir, **placement) -> Models:
    base = Placement.detect()
    return Models(resolve_profile("tiny", cache_dir=tiny_dir), Placement(**{**base.__dict__, **placement}))


def _job(models: Models, tmp_path, name: str, **kw):
    params = JobParams(**{"total_second_length": 2, "steps": 4, "seed": 5, **kw})
    events: list = []
    result = generate(params, noise_image(96, 80), events.append, models=models, output=OutputLayout(tmp_path / name))
    assert result.status == "succeeded", result
    assert result.frames == output_frames(section_count(2, 9), 9)
    previews = [e for e in events if isinstance(e, ev.PreviewReady)]
    assert len(previews) == section_count(2, 9) * params.steps
    return result, events


def test_high_vram_runs_on_the_gpu_in_bf16(tiny_dir, tmp_path):
    models = _models(tiny_dir, low_vram=False)
    assert models.placement.device == "cuda"
    result, _ = _job(models, tmp_path, "high", use_teacache=True)
    transformer = models.transformer(Variant.FRAMEPACK)
    assert next(transformer.parameters()).device.type == "cuda"
    assert next(transformer.parameters()).dtype in (torch.bfloat16, torch.float16)
    assert next(models.load_shared()["vae"].parameters()).device.type == "cuda"
    assert json.loads(result.sidecar.read_text())["device"] == "cuda"


def _device(module) -> str:
    return next(module.parameters()).device.type


def test_low_vram_without_streaming_keeps_the_transformer_and_moves_the_rest(tiny_dir, tmp_path):
    models = _models(tiny_dir, low_vram=True, group_offload=False)
    for name in ("first", "second"):  # a worker reuses its models: hooks of the last job must not pile up
        _job(models, tmp_path, name, use_teacache=True)
        shared = models.load_shared()
        assert _device(models.transformer(Variant.FRAMEPACK)) == "cuda"  # resident across jobs
        assert _device(shared["text_encoder"]) == "cpu"  # moved back once the next model ran
        assert not getattr(shared["text_encoder"], "_framepack_group_offload", False)


def test_low_vram_streams_both_large_models_with_the_step_cache(tiny_dir, tmp_path):
    models = _models(tiny_dir, low_vram=True, group_offload=True)
    result, _ = _job(models, tmp_path, "streamed", use_teacache=True)
    assert models.transformer(Variant.FRAMEPACK)._framepack_group_offload
    assert models.load_shared()["text_encoder"]._framepack_group_offload
    assert result.transformer_calls == section_count(2, 9) * 4
    _job(models, tmp_path, "streamed-again", use_teacache=False)  # stays streamed, still works


def test_gpu_memory_preservation_decides_on_the_real_free_memory(tiny_dir, tmp_path):
    """A ballast allocation leaves 20 GB free: preserving 6 GB keeps the transformer on the
    GPU, preserving 18 GB (less than the sampling margin left) streams it."""
    free = torch.cuda.mem_get_info()[0]
    if free < 21 * 2**30:
        pytest.skip("needs 21 GB of free GPU memory")
    ballast = torch.empty(free - 20 * 2**30, dtype=torch.uint8, device="cuda")
    try:
        keep = _models(tiny_dir, low_vram=True, group_offload=None)
        _job(keep, tmp_path, "keep", gpu_memory_preservation=6)
        assert not getattr(keep.transformer(Variant.FRAMEPACK), "_framepack_group_offload", False)
        assert _device(keep.transformer(Variant.FRAMEPACK)) == "cuda"
        del keep

        stream = _models(tiny_dir, low_vram=True, group_offload=None)
        _job(stream, tmp_path, "stream", gpu_memory_preservation=18)
        assert stream.transformer(Variant.FRAMEPACK)._framepack_group_offload
    finally:
        del ballast
        torch.cuda.empty_cache()


def test_preview_of_a_gpu_tensor_equals_the_cpu_preview():
    x0 = torch.randn(1, 16, 9, 10, 12, device="cuda")
    mapper = LatentToRGB(16)
    on_gpu, on_cpu = make_preview(x0, mapper), make_preview(x0.cpu(), mapper)
    assert (on_gpu.frames, on_gpu.tile_width, on_gpu.tile_height) == (9, 12, 10)
    a = np.asarray(Image.open(io.BytesIO(on_gpu.jpeg)), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(on_cpu.jpeg)), dtype=int)
    assert np.abs(a - b).max() <= 2  # the same strip up to float rounding before JPEG


# -- speed options on real CUDA (diffusers_helper.speed) ------------------------------------------
def _aligned_models(tiny_dir) -> Models:
    """Tiny models whose transformer blocks have FP8-friendly sizes (matrix dims multiple of 16:
    2 heads x 16), loaded on the GPU in bf16 as a high-VRAM worker holds them."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from diffusers_helper.tiny import transformer_config

    models = _models(tiny_dir, low_vram=False)
    torch.manual_seed(0)
    config = {**transformer_config(), "attention_head_dim": 16, "rope_axes_dim": (4, 6, 6), "num_layers": 2,
              "num_single_layers": 2}  # fmt: skip
    t = HunyuanVideoFramepackTransformer3DModel(**config).eval().requires_grad_(False)
    models._transformers[Variant.FRAMEPACK] = t.to("cuda", torch.bfloat16)
    return models


def test_compiled_fp8_blocks_run_jobs_close_to_eager_and_refuse_loras(tiny_dir, tmp_path):
    from bench.bench_speed import capture_step_inputs, rel_err
    from diffusers_helper import speed

    if torch.cuda.get_device_capability() < speed.FP8_MIN_CAPABILITY:
        pytest.skip("FP8 needs compute capability 8.9")
    eager_models = _aligned_models(tiny_dir)
    inputs = capture_step_inputs(eager_models, noise_image(96, 80), 64)
    with torch.no_grad():
        reference = eager_models.transformer(Variant.FRAMEPACK)(**inputs)[0]

    models = _aligned_models(tiny_dir)
    resolved = models.set_speed(speed.SpeedOptions("blocks", "fp8", "auto"))
    assert (resolved.compile, resolved.quant) == ("blocks", "fp8")
    transformer = models.transformer(Variant.FRAMEPACK)
    assert all(b._framepack_compiled for b in speed.blocks(transformer))
    weight = transformer.transformer_blocks[0].ff.net[2].weight
    assert "float8" in (type(weight).__name__ + str(getattr(weight, "qdata", weight).dtype)).lower()
    with torch.no_grad():
        assert rel_err(transformer(**inputs)[0], reference) < 0.1  # FP8 rounding, compiled blocks
    fast, _ = _job(models, tmp_path, "fast", use_teacache=False)
    assert fast.speed == resolved.public_dict()
    assert json.loads(fast.sidecar.read_text())["speed"]["quant"] == "fp8"

    with pytest.raises(ValueError, match="loras: .*FP8"):
        generate(JobParams(total_second_length=1, steps=1, seed=1, loras=[{"name": "x"}]), noise_image(96, 80),
                 models=models, output=OutputLayout(tmp_path / "lora"))  # fmt: skip


def test_speed_check_resolves_auto_on_this_gpu():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "diffusers_helper.speed", "compile=auto", "quant=auto",
                           "attention=auto"], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout.strip().splitlines()[-1])
    assert resolved["device"] == "cuda" and resolved["compile"] == "blocks"
    assert resolved["attention"] in ("_native_cudnn", "native")
