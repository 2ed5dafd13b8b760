"""Our section loop against diffusers' own pipeline, and prompts per section at the transformer's input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_helper.generate import OutputLayout, fitted_prompt_template, generate
from diffusers_helper.params import JobParams, Variant
from diffusers_helper.sections import pipeline_num_frames, section_count
from diffusers_helper.video import read_mp4, video_tensor_to_frames, write_mp4

from .conftest import noise_image

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", list(Variant))
def test_the_section_loop_reproduces_diffusers_pipeline(tiny_models, tmp_path, variant):
    """One prompt, no LoRA: the same calls and random numbers in the same order as
    ``HunyuanVideoFramepackPipeline.__call__``, so the same video, bit for bit."""
    params = JobParams(prompt="a cat", total_second_length=2, steps=3, seed=5, use_teacache=False, model=variant)
    image = noise_image(64, 64, seed=2)
    ours = generate(params, image, models=tiny_models, output=OutputLayout(tmp_path / "ours"))
    pipe = tiny_models.pipeline(variant)
    sections = section_count(2, 9)
    frames = pipe(
        image=image, prompt="a cat", height=64, width=64, num_frames=pipeline_num_frames(sections, 9),
        latent_window_size=9, num_inference_steps=3, guidance_scale=10.0,
        generator=torch.Generator("cpu").manual_seed(5), output_type="pt",
        prompt_template=fitted_prompt_template(pipe.tokenizer), max_sequence_length=256,
        sampling_type="inverted_anti_drifting" if variant is Variant.FRAMEPACK else "vanilla",
    ).frames  # fmt: skip
    pixels = video_tensor_to_frames(frames.permute(0, 2, 1, 3, 4) * 2 - 1)  # (B, T, C, H, W) in [0, 1]
    theirs = read_mp4(write_mp4(tmp_path / "theirs.mp4", pixels, crf=params.mp4_crf))  # the same encoder
    mine = read_mp4(ours.video)
    assert mine.shape == theirs.shape == (73, 64, 64, 3)
    assert np.abs(mine.astype(int) - theirs.astype(int)).mean() < 0.05  # float rounding of [0,1] <-> [-1,1]
    other = generate(params.model_copy(update={"seed": 6}), image, models=tiny_models,
                     output=OutputLayout(tmp_path / "other"))  # fmt: skip
    assert np.abs(read_mp4(other.video).astype(int) - theirs.astype(int)).mean() > 1  # the check can fail


def _section_inputs(models, variant, params, out):
    """The text embeddings the transformer received, one per section (first call of each)."""
    transformer = models.transformer(variant)
    seen: list[torch.Tensor] = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = generate(params, noise_image(64, 64), models=models, output=OutputLayout(out))
    finally:
        handle.remove()
    return result, seen[:: params.steps]


def _embeds(models, variant, text: str) -> torch.Tensor:
    pipe = models.pipeline(variant)
    template = fitted_prompt_template(pipe.tokenizer)
    embeds, _, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_template=template,
                                      device=pipe._execution_device, max_sequence_length=256)  # fmt: skip
    return embeds.to(pipe.transformer.dtype)


@pytest.mark.parametrize("variant", list(Variant))
def test_each_section_gets_the_embeddings_its_prompt_says(tiny_models, tmp_path, variant):
    prompt = "idle [0s: a man waves] [1.1s: he spins]"  # 3 sections: waves, spins, spins (in time)
    params = JobParams(prompt=prompt, total_second_length=4, steps=2, seed=1, use_teacache=False, model=variant)
    result, per_section = _section_inputs(tiny_models, variant, params, tmp_path / "a")
    wave, spin = (_embeds(tiny_models, variant, t) for t in ("a man waves", "he spins"))
    in_time = [wave, spin, spin]
    expected = in_time if variant is Variant.FRAMEPACK_F1 else in_time[::-1]  # the original: end first
    assert len(per_section) == 3
    for got, want in zip(per_section, expected, strict=True):
        assert torch.equal(got, want)
    assert [s["text"] for s in result.prompt_schedule] == ["a man waves", "he spins", "he spins"]

    blended = params.model_copy(update={"prompt_blend_sections": 2})
    _, per_section = _section_inputs(tiny_models, variant, blended, tmp_path / "b")
    if variant is Variant.FRAMEPACK_F1:  # generation order: wave, spin (change), spin
        expected = [wave, torch.lerp(wave, spin, 0.5), spin]
    else:  # generation order: spin, spin, wave (change at the third)
        expected = [spin, spin, torch.lerp(spin, wave, 0.5)]
    for got, want in zip(per_section, expected, strict=True):
        assert torch.allclose(got, want)
