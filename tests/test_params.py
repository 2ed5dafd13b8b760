"""The one parameter schema: defaults, ranges, the end-image rule, random seeds."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from diffusers_helper.params import MAX_SEED, JobParams, Variant, field_errors


def test_defaults_are_framepacks():
    p = JobParams()
    assert (p.total_second_length, p.latent_window_size, p.steps) == (5, 9, 25)
    assert (p.cfg, p.gs, p.rs, p.gpu_memory_preservation) == (1.0, 10.0, 0.0, 6.0)
    assert p.use_teacache is True and p.mp4_crf == 16 and p.model is Variant.FRAMEPACK
    assert p.seed is None and p.resolution is None


@pytest.mark.parametrize(
    "field,value",
    [
        ("total_second_length", 0.5),
        ("total_second_length", 121),
        ("latent_window_size", 0),
        ("latent_window_size", 34),
        ("steps", 0),
        ("steps", 101),
        ("cfg", 0.5),
        ("cfg", 33),
        ("gs", 0),
        ("gs", 33),
        ("rs", -0.1),
        ("rs", 1.5),
        ("gpu_memory_preservation", 5),
        ("gpu_memory_preservation", 129),
        ("mp4_crf", -1),
        ("mp4_crf", 52),
        ("seed", -2),
        ("seed", MAX_SEED + 1),
        ("resolution", 16),
        ("resolution", 4096),
        ("steps", "many"),
        ("use_teacache", "perhaps"),
        ("model", "sora"),
    ],
)
def test_each_bad_field_is_named(field, value):
    with pytest.raises(ValidationError) as exc:
        JobParams(**{field: value})
    errors = field_errors(exc.value)
    assert [e["field"] for e in errors] == [field], errors


def test_unknown_field_is_named():
    with pytest.raises(ValidationError) as exc:
        JobParams(stepz=3)
    assert field_errors(exc.value)[0]["field"] == "stepz"


def test_end_image_with_f1_names_end_image():
    JobParams(model="framepack", end_image="end.png")  # fine
    with pytest.raises(ValidationError) as exc:
        JobParams(model="framepack-f1", end_image="end.png")
    (err,) = field_errors(exc.value)
    assert err["field"] == "end_image" and "framepack-f1" in err["message"]


@pytest.mark.parametrize("seed", [None, -1])
def test_random_seed_is_chosen_and_concrete(seed):
    seeds = {JobParams(seed=seed).with_seed().seed for _ in range(5)}
    assert all(isinstance(s, int) and 0 <= s <= MAX_SEED for s in seeds)
    assert len(seeds) > 1  # 5 draws from 2**32 colliding would be astonishing


def test_given_seed_is_kept():
    assert JobParams(seed=0).with_seed().seed == 0
    assert JobParams(seed=42).with_resolution(64).resolution == 64
    assert JobParams(resolution=128).with_resolution(64).resolution == 128


def test_schema_modules_do_not_import_torch():
    code = (
        "import sys; import diffusers_helper, diffusers_helper.params, diffusers_helper.sections, "
        "diffusers_helper.buckets, diffusers_helper.events; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
