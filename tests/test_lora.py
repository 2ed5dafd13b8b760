"""LoRAs per job on the tiny transformer: made by the test, loaded through diffusers (PEFT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusers_helper.generate import OutputLayout, generate
from diffusers_helper.lora import LoraError
from diffusers_helper.lora_files import detect_format, list_loras, resolve
from diffusers_helper.params import JobParams, LoraSpec
from diffusers_helper.profiles import Models, resolve_profile
from diffusers_helper.video import read_mp4

from .conftest import noise_image

pytestmark = pytest.mark.slow

#: Modules of the tiny transformer (in, out) the test LoRA adapts.
TARGETS = {"transformer_blocks.0.attn.to_q": (20, 20), "single_transformer_blocks.0.attn.to_k": (20, 20),
           "single_transformer_blocks.0.proj_out": (100, 20)}  # fmt: skip
RANK = 2


def _pairs(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(RANK, fan_in, generator=g) * 0.3, torch.randn(fan_out, RANK, generator=g) * 0.3)
            for name, (fan_in, fan_out) in TARGETS.items()}  # fmt: skip


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    d = tmp_path / "loras"
    d.mkdir()
    pairs = _pairs()
    save_file({f"transformer.{n}.lora_{ab}.weight": t for n, (a, b) in pairs.items()
               for ab, t in (("A", a), ("B", b))}, str(d / "wiggle.safetensors"))  # fmt: skip
    kohya = {}
    for name, (a, b) in pairs.items():
        flat = "lora_unet_" + name.replace(".", "_")
        kohya |= {f"{flat}.lora_down.weight": a, f"{flat}.lora_up.weight": b / 2, f"{flat}.alpha": torch.tensor(4.0)}
    save_file(kohya, str(d / "wiggle-kohya.safetensors"))  # alpha 4 / rank 2 = scale 2: the same adapter
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 20),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(60, RANK)},
              str(d / "musubi.safetensors"))  # fmt: skip
    (d / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    g = torch.Generator().manual_seed(5)  # the original HunyuanVideo layout (fused qkv), converted by diffusers
    save_file({"diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight": torch.randn(RANK, 20, generator=g) * 0.3,
               "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight": torch.randn(60, RANK, generator=g) * 0.3},
              str(d / "original.safetensors"))  # fmt: skip
    return d


def _run(models, lora_dir, tmp_path, name, loras=()):
    params = JobParams(total_second_length=1, steps=3, seed=9, use_teacache=False,
                       loras=[LoraSpec(name=n, weight=w) for n, w in loras])  # fmt: skip
    result = generate(params, noise_image(64, 64), models=models, output=OutputLayout(tmp_path / name),
                      lora_dir=lora_dir)  # fmt: skip
    return result, read_mp4(result.video).astype(int)


def test_a_lora_changes_the_video_for_its_job_only(tiny_dir, lora_dir, tmp_path):
    models = Models(resolve_profile("tiny", cache_dir=tiny_dir))
    _, plain = _run(models, lora_dir, tmp_path, "plain")
    with_lora, wiggled = _run(models, lora_dir, tmp_path, "lora", [("wiggle", 1.0)])
    assert np.abs(wiggled - plain).mean() > 1, "the LoRA changed nothing"
    (info,) = with_lora.loras
    assert info["name"] == "wiggle" and info["weight"] == 1.0 and len(info["sha256"]) == 64
    _, zero = _run(models, lora_dir, tmp_path, "zero", [("wiggle", 0.0)])
    assert np.array_equal(zero, plain)  # weight 0 is no LoRA
    _, after = _run(models, lora_dir, tmp_path, "after")
    fresh = Models(resolve_profile("tiny", cache_dir=tiny_dir))
    _, never = _run(fresh, lora_dir, tmp_path, "fresh")
    assert np.array_equal(after, never) and np.array_equal(after, plain)  # nothing inherited
    _, kohya = _run(models, lora_dir, tmp_path, "kohya", [("wiggle-kohya", 1.0)])
    assert np.abs(kohya - wiggled).mean() < 0.05  # the same adapter, written by kohya (alpha folded in)
    original, video = _run(models, lora_dir, tmp_path, "original", [("original", 1.0)])
    assert original.loras[0]["format"] == "hunyuan-original" and np.abs(video - plain).mean() > 1
    _, both = _run(models, lora_dir, tmp_path, "both", [("wiggle", 1.0), ("original", 1.0)])
    assert np.abs(both - wiggled).mean() > 1 and np.abs(both - video).mean() > 1  # several at once


def test_unusable_files_are_refused_saying_why(tiny_models, lora_dir, tmp_path):
    with pytest.raises(LoraError, match="kohya/musubi format .*double_blocks_0_img_attn_qkv"):
        _run(tiny_models, lora_dir, tmp_path, "musubi", [("musubi", 1.0)])
    with pytest.raises(LoraError, match="broken.safetensors: not a readable safetensors file"):
        _run(tiny_models, lora_dir, tmp_path, "broken", [("broken", 1.0)])
    _, plain = _run(tiny_models, lora_dir, tmp_path, "after-refusals")  # the worker goes on


def test_the_directory_lists_files_with_their_format_and_refuses_paths(lora_dir):
    listed = {entry["name"]: entry for entry in list_loras(lora_dir)}
    assert listed["wiggle"]["format"] == "diffusers" and listed["wiggle"]["size"] > 0
    assert listed["wiggle-kohya"]["format"] == "kohya" and listed["musubi"]["format"] == "kohya"
    assert listed["broken"]["format"].startswith("unreadable")
    assert resolve(lora_dir, "wiggle") == lora_dir / "wiggle.safetensors"
    for bad in ("../wiggle", "/etc/passwd", "sub/wiggle", "missing"):
        with pytest.raises(ValueError):
            resolve(lora_dir, bad)
    assert detect_format(["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"]) == "hunyuan-original"
