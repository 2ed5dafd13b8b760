"""generate() end to end on the tiny profile: the real diffusers pipeline, tiny weights."""

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
from diffusers_helper.preview import LatentToRGB, encode_jpeg, rgb_strip
from diffusers_helper.sections import output_frames, section_count
from diffusers_helper.video import read_mp4

from .conftest import noise_image

pytestmark = pytest.mark.slow


def run(models, tmp_path, name="job", image=None, cancel=None, **kw):
    end_image = kw.pop("end", None)
    threshold = kw.pop("cache_threshold", None)
    params = JobParams(**{"total_second_length": 2, "steps": 3, "seed": 7, "use_teacache": False, **kw})
    events: list = []
    extra = {"cache_threshold": threshold} if threshold is not None else {}
    result = generate(
        params,
        image or noise_image(96, 80),
        events.append,
        (lambda: cancel(events)) if cancel else None,
        models=models,
        output=OutputLayout(tmp_path / name),
        end_image=end_image,
        **extra,
    )
    return result, events


@pytest.mark.parametrize("variant", list(Variant))
def test_both_variants_end_to_end(tiny_models, tmp_path, variant):
    result, events = run(tiny_models, tmp_path, model=variant.value)
    sections = section_count(2, 9)
    assert result.status == "succeeded"
    assert result.frames == output_frames(sections, 9) == 73
    video = read_mp4(result.video)
    assert video.shape == (73, result.height, result.width, 3)
    assert (result.height, result.width) == (64, 48)  # 96x80 portrait -> nearest 64-base bucket

    stages = [e.text for e in events if isinstance(e, ev.Stage)]
    assert stages[:2] == [ev.STAGE_STARTING, ev.STAGE_LOADING]
    assert stages.index(ev.STAGE_TEXT) < stages.index(ev.STAGE_VAE) < stages.index(ev.STAGE_SAMPLING)

    progress = [e for e in events if isinstance(e, ev.Progress)]
    assert len(progress) == sections * 3
    assert [p.progress for p in progress] == sorted(p.progress for p in progress)
    assert progress[-1].progress == 1.0 and progress[0].progress == pytest.approx(1 / 6)
    assert [(p.section, p.step) for p in progress[:4]] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert progress[-1].eta_seconds == 0

    previews = [e for e in events if isinstance(e, ev.PreviewReady)]
    assert len(previews) == len(progress)
    for p in previews:
        img = Image.open(io.BytesIO(p.preview.jpeg))
        assert img.size == (p.preview.frames * p.preview.tile_width, p.preview.tile_height)
        assert (p.preview.frames, p.preview.tile_height, p.preview.tile_width) == (9, 8, 6)

    done = [e for e in events if isinstance(e, ev.SectionDone)]
    assert [d.section for d in done] == [1, 2]
    assert len(read_mp4(done[0].path)) == done[0].frames < done[1].frames == 73
    side = json.loads(result.sidecar.read_text())
    assert side["seed"] == 7 and side["frames"] == 73 and side["status"] == "succeeded"
    assert side["profile"]["name"] == "tiny" and side["profile"]["is_noise"] is True
    assert side["params"]["model"] == variant.value
    assert {"sampling", "total", "text_encoding"} <= set(side["timings"])
    assert Image.open(result.input_image).size == (48, 64)


def test_end_image_path(tiny_models, tmp_path):
    result, _ = run(tiny_models, tmp_path, end=noise_image(80, 80, seed=3), total_second_length=1)
    assert result.status == "succeeded" and result.frames == 37
    assert (tmp_path / "job" / "video-end.png").exists()
    with pytest.raises(ValueError, match="end_image"):
        run(tiny_models, tmp_path, name="f1", end=noise_image(80, 80), model="framepack-f1")


def test_same_seed_same_frames_other_seed_other_frames(tiny_models, tmp_path):
    a, _ = run(tiny_models, tmp_path, "a", total_second_length=1, seed=123)
    b, _ = run(tiny_models, tmp_path, "b", total_second_length=1, seed=123)
    c, _ = run(tiny_models, tmp_path, "c", total_second_length=1, seed=124)
    va, vb, vc = (read_mp4(r.video) for r in (a, b, c))
    assert np.array_equal(va, vb)
    assert np.abs(va.astype(int) - vc.astype(int)).mean() > 1


@pytest.mark.parametrize("seed", [None, -1])
def test_random_seed_is_recorded(tiny_models, tmp_path, seed):
    result, _ = run(tiny_models, tmp_path, total_second_length=1, steps=1, seed=seed)
    side = json.loads(result.sidecar.read_text())
    assert isinstance(result.seed, int) and result.seed >= 0
    assert side["seed"] == side["params"]["seed"] == result.seed


def test_cache_skips_steps_at_a_threshold_that_must_skip(tiny_models, tmp_path):
    result, _ = run(tiny_models, tmp_path, steps=6, use_teacache=True, cache_threshold=1e9)
    assert result.transformer_calls == 12
    assert result.cache_skipped_steps > 0
    assert json.loads(result.sidecar.read_text())["cache"]["skipped_steps"] == result.cache_skipped_steps
    off, _ = run(tiny_models, tmp_path, "off", steps=6, use_teacache=False)
    assert off.transformer_calls == 12 and off.cache_skipped_steps == 0


def test_real_cfg_doubles_transformer_calls(tiny_models, tmp_path):
    result, _ = run(tiny_models, tmp_path, total_second_length=1, steps=2, cfg=3.0, n_prompt="blur")
    assert result.status == "succeeded" and result.transformer_calls == 4


def test_cancel_after_first_section_keeps_it(tiny_models, tmp_path):
    def cancel(events):
        return any(isinstance(e, ev.SectionDone) for e in events)

    result, events = run(tiny_models, tmp_path, total_second_length=3, cancel=cancel)
    assert result.status == "cancelled"
    assert result.video is None and not (tmp_path / "job" / "video.mp4").exists()
    assert len(result.section_videos) == 1
    assert len(read_mp4(result.section_videos[0])) == result.frames > 0
    # stopped at once: not one sampling step of section 2 ran
    assert max(e.section for e in events if isinstance(e, ev.Progress)) == 1
    side = json.loads(result.sidecar.read_text())
    assert side["status"] == "cancelled" and side["video"] is None and side["sections_done"] == 1


def test_preview_is_the_x0_prediction(tiny_models, tmp_path):
    """An independent hook on the transformer reads x_t and v; x0 = x_t - sigma * v."""
    transformer = tiny_models.transformer(Variant.FRAMEPACK)
    seen = []

    def hook(_module, args, kwargs, output):
        sigma = kwargs["timestep"].float() / 1000.0  # flow matching: t = 1000 * sigma
        seen.append((kwargs["hidden_states"].clone(), sigma, output[0].clone()))

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        _, events = run(tiny_models, tmp_path, total_second_length=1, steps=4)
    finally:
        handle.remove()
    previews = [e.preview for e in events if isinstance(e, ev.PreviewReady)]
    assert len(previews) == len(seen) == 4
    mapper = LatentToRGB(16)

    def pixels(jpeg: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(jpeg)), dtype=float)

    def as_preview(latents: torch.Tensor) -> np.ndarray:  # same map and JPEG coding as ours
        return pixels(encode_jpeg(rgb_strip(mapper(latents))))

    for i, ((x_t, sigma, v), preview) in enumerate(zip(seen, previews, strict=True)):
        shown = pixels(preview.jpeg)
        x0 = x_t - sigma.view(-1, 1, 1, 1, 1) * v
        err_x0 = np.abs(shown - as_preview(x0)).mean()
        assert err_x0 < 0.5, f"step {i}: preview is not the map of x0 ({err_x0:.2f})"
        if i + 1 < len(seen):  # x_{t-1} of this step is the next step's input
            err_prev = np.abs(shown - as_preview(seen[i + 1][0])).mean()
            assert err_prev > 5, f"step {i}: preview looks like the map of x_(t-1) ({err_prev:.2f})"


def test_cfg_rescale_changes_guided_runs_only(tiny_models, tmp_path):
    base = {"total_second_length": 1, "steps": 3, "seed": 21}
    a, _ = run(tiny_models, tmp_path, "a", cfg=3.0, n_prompt="blur", rs=0.0, **base)
    b, _ = run(tiny_models, tmp_path, "b", cfg=3.0, n_prompt="blur", rs=0.9, **base)
    c, _ = run(tiny_models, tmp_path, "c", cfg=1.0, rs=0.0, **base)
    d, _ = run(tiny_models, tmp_path, "d", cfg=1.0, rs=0.9, **base)
    va, vb, vc, vd = (read_mp4(r.video).astype(int) for r in (a, b, c, d))
    assert np.abs(va - vb).mean() > 0.5  # re-scale acts on real CFG...
    assert np.array_equal(vc, vd)  # ...and, as in FramePack, not without it
