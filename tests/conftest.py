"""Shared fixtures: the tiny profile built once per test session, in a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers_helper.tiny import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("cache") / "tiny")


@pytest.fixture(scope="session")
def tiny_models(tiny_dir: Path):
    from diffusers_helper.profiles import Models, resolve_profile

    return Models(resolve_profile("tiny", cache_dir=tiny_dir))


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture
def image() -> Image.Image:
    return noise_image(96, 80)
