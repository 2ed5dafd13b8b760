"""FramePack's section arithmetic (torch-free).

FramePack thinks in seconds: ``N = max(round(seconds * 30 / (lws * 4)), 1)`` sections,
each adding ``lws * 4`` frames.  diffusers' pipeline thinks in ``num_frames`` and derives
``max(1, ceil(num_frames / ((lws - 1) * 4 + 1)))`` sections.  These helpers translate the
first into the second so a job yields exactly the sections FramePack would run, and say
how many frames and seconds that produces.
"""

from __future__ import annotations

from .params import FPS

#: HunyuanVideo's VAE packs four video frames into one latent frame.
TEMPORAL_RATIO = 4


def section_count(seconds: float, latent_window_size: int) -> int:
    """Sections FramePack runs for a video of ``seconds`` (Python's round, as FramePack)."""
    return max(int(round(seconds * FPS / (latent_window_size * TEMPORAL_RATIO))), 1)


def pipeline_num_frames(sections: int, latent_window_size: int) -> int:
    """The ``num_frames`` to hand diffusers' pipeline so that it runs ``sections`` sections."""
    window_frames = (latent_window_size - 1) * TEMPORAL_RATIO + 1
    return sections * window_frames


def output_frames(sections: int, latent_window_size: int) -> int:
    """Frames in the finished video: ``sections * lws * 4 + 1``."""
    return sections * latent_window_size * TEMPORAL_RATIO + 1


def output_seconds(frames: int) -> float:
    return frames / FPS
