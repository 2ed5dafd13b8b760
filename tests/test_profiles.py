"""Profiles load through from_pretrained with no network, the real repos' layout included."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_helper.generate import OutputLayout, generate
from diffusers_helper.params import JobParams, Variant
from diffusers_helper.profiles import HF_BASE, HF_IMAGE_ENCODER, HF_TRANSFORMERS, Models, resolve_profile

from .conftest import noise_image

pytestmark = pytest.mark.slow


def test_tiny_profile_loads_from_its_directory_without_network(tiny_dir, tmp_path, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    profile = resolve_profile("tiny", cache_dir=tiny_dir)
    assert profile.is_noise and Path(profile.base).parent == tiny_dir
    models = Models(profile)  # a fresh instance: nothing cached in memory
    result = generate(
        JobParams(total_second_length=1, steps=1, seed=1),
        noise_image(64, 64),
        models=models,
        output=OutputLayout(tmp_path),
    )
    assert result.status == "succeeded" and models.loaded_variants == ["framepack"]


def _snapshot(hub: Path, repo: str) -> Path:
    """A Hugging Face cache entry for ``repo`` (what `hf download` leaves behind)."""
    entry = hub / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _framepack_layout_transformer(src: Path, dst: Path) -> None:
    """Re-save a tiny transformer the way lllyasviel's repos store theirs."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(src)
    model.save_pretrained(dst, max_shard_size="40KB")
    config = json.loads((dst / "config.json").read_text())
    config["_class_name"] = "HunyuanVideoTransformer3DModelPacked"
    config["_diffusers_version"] = "0.33.0.dev0"
    (dst / "config.json").write_text(json.dumps(config))
    assert (dst / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(dst.glob("diffusion_pytorch_model-0000*-of-*.safetensors"))) > 1


@pytest.fixture(scope="module")
def hf_cache(tiny_dir, tmp_path_factory) -> Path:
    hub = tmp_path_factory.mktemp("hf") / "hub"
    base = _snapshot(hub, HF_BASE)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"):
        shutil.copytree(tiny_dir / "base" / sub, base / sub)
    (base / "model_index.json").write_text(
        json.dumps({"_class_name": "HunyuanVideoPipeline", "_diffusers_version": "0.32.0.dev0"})
    )
    enc = _snapshot(hub, HF_IMAGE_ENCODER)
    for sub in ("feature_extractor", "image_encoder"):
        shutil.copytree(tiny_dir / "image_encoder" / sub, enc / sub)
    for variant, repo in HF_TRANSFORMERS.items():
        _framepack_layout_transformer(tiny_dir / variant.value, _snapshot(hub, repo))
    return hub


def _cli(args: list[str], hub: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub.parent)}
    return subprocess.run(
        [sys.executable, "-m", "diffusers_helper.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.parametrize("variant", list(Variant))
def test_hf_profile_loads_the_real_repo_layout_offline(hf_cache, tmp_path, variant):
    noise_image(64, 64).save(tmp_path / "in.png")
    proc = _cli(
        ["generate", "in.png", "--profile", "hf", "--resolution", "64", "--seconds", "1", "--steps", "2",
         "--model", variant.value, "--seed", "5", "-o", "out.mp4"],
        hf_cache, tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    side = json.loads((tmp_path / "out.json").read_text())
    assert side["profile"]["name"] == "hf" and side["profile"]["is_noise"] is False
    assert side["frames"] == 37 and side["params"]["model"] == variant.value


def test_missing_model_names_the_repo_and_how_to_download(tmp_path):
    noise_image(64, 64).save(tmp_path / "in.png")
    proc = _cli(["generate", "in.png", "--profile", "hf", "-o", "out.mp4"], tmp_path / "empty-hub", tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert HF_BASE in proc.stderr and f"hf download {HF_BASE}" in proc.stderr


def test_random_full_profile_is_noise_and_refused_on_a_cpu_with_one_line():
    import torch

    from diffusers_helper.profiles import RANDOM_FULL, ModelNotFoundError, Placement

    profile = resolve_profile(RANDOM_FULL)
    assert profile.in_memory and profile.is_noise and profile.default_resolution == 640
    models = Models(profile, Placement("cpu", torch.float32, torch.float32))
    with pytest.raises(ModelNotFoundError, match="needs a CUDA GPU.*use the tiny profile here"):
        models.load_shared()
    with pytest.raises(ModelNotFoundError, match="needs a CUDA GPU"):
        models.transformer(Variant.FRAMEPACK)
