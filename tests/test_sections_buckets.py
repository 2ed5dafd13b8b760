"""Section arithmetic and resolution buckets (pure functions)."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from diffusers_helper.buckets import BUCKETS_640, buckets, fit_to_bucket, nearest_bucket
from diffusers_helper.sections import output_frames, pipeline_num_frames, section_count


@pytest.mark.parametrize(
    "seconds,lws,sections",
    [(5, 9, 4), (1, 9, 1), (2, 9, 2), (10, 9, 8), (120, 9, 100), (5, 5, 8), (3, 33, 1), (60, 33, 14)],
)
def test_section_count_matches_framepack(seconds, lws, sections):
    assert section_count(seconds, lws) == sections


@pytest.mark.parametrize("sections,lws", [(1, 9), (2, 9), (4, 9), (7, 5), (3, 1), (2, 33)])
def test_pipeline_runs_the_same_sections(sections, lws):
    # diffusers' own formula, written out independently of ours
    window = (lws - 1) * 4 + 1
    n = pipeline_num_frames(sections, lws)
    assert max(1, math.ceil(n / window)) == sections


def test_output_frames():
    assert output_frames(4, 9) == 145  # FramePack's 5 s default
    assert output_frames(1, 9) == 37
    assert output_frames(2, 5) == 41


def test_square_goes_to_640x608():
    assert nearest_bucket(1000, 1000, 640) == (640, 608)
    assert nearest_bucket(480, 832, 640) == (480, 832)
    assert nearest_bucket(1080, 1920, 640) == (480, 832)
    assert nearest_bucket(400, 1000, 640) == (416, 960)


def test_other_bases_are_scaled_multiples_of_16():
    assert buckets(640) == list(BUCKETS_640)
    for base in (64, 320, 960):
        for h, w in buckets(base):
            assert h % 16 == 0 and w % 16 == 0
    assert nearest_bucket(300, 300, 64) == (64, 64)


def test_fit_to_bucket_resizes_and_crops():
    img = Image.new("RGB", (1000, 500), (10, 200, 30))
    out = fit_to_bucket(img, 640)
    assert (out.height, out.width) == (448, 864)
    assert out.getpixel((432, 224)) == (10, 200, 30)
