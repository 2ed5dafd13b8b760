"""Section checkpoints in-process: resume exactly where a run stopped, extend a finished video."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffusers_helper import events as ev
from diffusers_helper.generate import OutputLayout, generate
from diffusers_helper.params import JobParams, Variant
from diffusers_helper.video import read_mp4

from .conftest import noise_image

pytestmark = pytest.mark.slow

OVERLAP = (9 - 1) * 4 + 1  # frames blended where a section meets the video so far


def _job(models, out, params, **kw):
    events: list = []
    result = generate(params, noise_image(64, 64, seed=1), events.append, kw.pop("cancel", None), models=models,
                      output=OutputLayout(out), **kw)  # fmt: skip
    return result, events


@pytest.mark.parametrize("variant", list(Variant))
def test_a_stopped_run_resumes_after_its_last_section_and_ends_identical(tiny_models, tmp_path, variant):
    params = JobParams(prompt="p [0s: a] [2.2s: b]", total_second_length=3.6, steps=3, seed=11,
                       use_teacache=False, model=variant)  # fmt: skip  (3 sections)
    whole, _ = _job(tiny_models, tmp_path / "whole", params)
    assert whole.sections == 3 and whole.checkpoint_bytes > 0

    def after_two(events) -> bool:  # the worker "dies" once section 2 is written
        return sum(isinstance(e, ev.SectionDone) for e in events) == 2

    seen: list = []
    stopped = generate(params, noise_image(64, 64, seed=1), seen.append, lambda: after_two(seen),
                       models=tiny_models, output=OutputLayout(tmp_path / "job"))  # fmt: skip
    assert stopped.status == "cancelled" and len(stopped.section_videos) == 2
    resumed, events = _job(tiny_models, tmp_path / "job", params, resume=True)
    assert resumed.status == "succeeded" and resumed.resumed_from_section == 2
    assert [e.section for e in events if isinstance(e, ev.Resumed)] == [2]
    assert {e.section for e in events if isinstance(e, ev.Progress)} == {3}  # sections 1-2 not sampled again
    assert np.array_equal(read_mp4(resumed.video), read_mp4(whole.video))  # bit-identical on CPU
    assert json.loads(resumed.sidecar.read_text())["resumed_from_section"] == 2

    other = params.model_copy(update={"gs": 5.0})  # a checkpoint of other parameters is not used
    fresh, _ = _job(tiny_models, tmp_path / "job", other, resume=True)
    assert fresh.resumed_from_section is None and fresh.status == "succeeded"


@pytest.mark.parametrize("variant", list(Variant))
def test_a_finished_video_extends_forward_with_f1(tiny_models, tmp_path, variant):
    params = JobParams(prompt="a walk", total_second_length=2.4, steps=2, seed=3, use_teacache=False, model=variant)
    first, _ = _job(tiny_models, tmp_path / "first", params)
    original = read_mp4(first.video)
    more = params.model_copy(update={"model": Variant.FRAMEPACK_F1, "total_second_length": 1.2, "prompt": "a jump"})
    longer, events = _job(tiny_models, tmp_path / "ext", more, extend_from=OutputLayout(tmp_path / "first").checkpoint)
    video = read_mp4(longer.video)
    assert longer.extended_sections == 2 and len(video) == len(original) + 36  # one more section of 36 frames
    assert [e.section for e in events if isinstance(e, ev.SectionDone)] == [3]
    kept = len(original) - OVERLAP  # the frames before the blend are the original's
    assert np.abs(video[:kept].astype(int) - original[:kept].astype(int)).mean() < 1.0
    assert np.abs(video[-36:].astype(int) - original[-36:].astype(int)).mean() > 1  # and then something new
    with pytest.raises(ValueError, match="framepack-f1"):
        _job(tiny_models, tmp_path / "bad", params.model_copy(update={"model": Variant.FRAMEPACK}),
             extend_from=OutputLayout(tmp_path / "first").checkpoint)  # fmt: skip
