"""The preview map and the mp4 writer (pure code, no model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_helper.preview import LatentToRGB, make_preview, rgb_strip
from diffusers_helper.video import read_mp4, write_mp4


def test_one_hot_channel_maps_to_its_factor_plus_bias():
    latents = torch.zeros(1, 16, 2, 3, 4)
    latents[0, 10] = 1.0  # channel 10: (0.1166, 0.1627, 0.0962), bias (0.0259, -0.0192, -0.0761)
    rgb = LatentToRGB(16)(latents)
    assert rgb.shape == (3, 2, 3, 4)
    expected = torch.tensor([0.1166 + 0.0259, 0.1627 - 0.0192, 0.0962 - 0.0761])
    assert torch.allclose(rgb[:, 0, 0, 0], expected, atol=1e-6)
    assert torch.allclose(rgb[:, 1, 2, 3], expected, atol=1e-6)


def test_map_clamps_to_unit_range():
    rgb = LatentToRGB(16)(torch.full((16, 1, 2, 2), 100.0))
    assert rgb.min() >= 0 and rgb.max() <= 1
    zero = LatentToRGB(16)(torch.zeros(16, 1, 1, 1))[:, 0, 0, 0]
    assert torch.allclose(zero, torch.tensor([0.0259, 0.0, 0.0]), atol=1e-6)  # bias, clamped


def test_fallback_map_for_other_channel_counts():
    mapper = LatentToRGB(4)
    latents = torch.zeros(4, 1, 1, 1)
    assert torch.allclose(mapper(latents)[:, 0, 0, 0], torch.full((3,), 0.5))
    latents[0] = 2.0  # the first group drives red only
    r, g, b = mapper(latents)[:, 0, 0, 0]
    assert r > 0.5 and g == 0.5 and b == 0.5


def test_strip_lays_frames_side_by_side():
    rgb = torch.zeros(3, 3, 2, 5)
    for t in range(3):
        rgb[:, t] = t / 2
    strip = rgb_strip(rgb)
    assert strip.shape == (2, 15, 3)
    assert (strip[:, 0:5] == 0).all() and (strip[:, 5:10] == 128).all() and (strip[:, 10:15] == 255).all()


def test_preview_is_a_jpeg_of_the_announced_geometry():
    preview = make_preview(torch.randn(1, 16, 9, 10, 12), LatentToRGB(16))
    img = Image.open(io.BytesIO(preview.jpeg))
    assert img.format == "JPEG"
    assert (preview.frames, preview.tile_width, preview.tile_height) == (9, 12, 10)
    assert img.size == (9 * 12, 10)


@pytest.mark.parametrize("frames,h,w,crf", [(1, 32, 48, 16), (37, 64, 48, 0), (10, 48, 64, 30)])
def test_mp4_round_trip(tmp_path, frames, h, w, crf):
    rng = np.random.default_rng(0)
    video = np.repeat(rng.integers(0, 255, (frames, h // 8, w // 8, 3), dtype=np.uint8), 8, 1).repeat(8, 2)
    path = write_mp4(tmp_path / "v.mp4", video, crf=crf)
    decoded = read_mp4(path)
    assert decoded.shape == (frames, h, w, 3)
    assert np.abs(decoded.astype(int) - video.astype(int)).mean() < 20
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary left behind


def test_mp4_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "v.mp4", np.zeros((2, 8, 8), np.uint8))
    assert not (tmp_path / "v.mp4").exists()


def test_mp4_has_moov_first_for_streaming(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", np.zeros((5, 32, 32, 3), np.uint8))
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart


def test_cfg_rescale_formula():
    from diffusers_helper.sampler import rescale_guidance

    torch.manual_seed(0)
    guided, cond = torch.randn(2, 4, 3, 5, 5) * 3, torch.randn(2, 4, 3, 5, 5)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    full = rescale_guidance(guided, cond, 1.0)
    dims = [1, 2, 3, 4]
    assert torch.allclose(full.std(dim=dims), cond.std(dim=dims), rtol=1e-5)  # per sample
    half = rescale_guidance(guided, cond, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided)
