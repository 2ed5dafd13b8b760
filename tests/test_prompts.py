"""Timestamped prompts: FramePack-Studio's syntax resolved to one prompt per section (fast lane)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from diffusers_helper.params import JobParams, PromptSpan, Variant
from diffusers_helper.prompts import blend_weights, generation_order, parse, schedule, section_seconds


def texts(prompt, spans=None, sections=5, lws=9):
    return [p.text for p in schedule(prompt, spans, sections, lws)]


def test_studio_syntax_default_outside_brackets():
    default, spans = parse("a man stands [0s: a man waves] [2s-4s: he jumps] [4.5s: he spins]")
    assert default == "a man stands"
    assert [(s.start, s.end, s.text) for s in spans] == [(0, None, "a man waves"), (2, 4, "he jumps"),
                                                          (4.5, None, "he spins")]  # fmt: skip
    assert parse("no brackets at all") == ("no brackets at all", [])


def test_times_snap_to_section_boundaries_of_1_1_seconds():
    assert section_seconds(9) == pytest.approx(1.1)
    # 5 sections: [0, 1.1) [1.1, 2.2) [2.2, 3.3) [3.3, 4.4) [4.4, 5.5)
    assert texts("idle [2s: jump]") == ["idle", "idle", "jump", "jump", "jump"]
    assert texts("idle [1s-3s: jump]") == ["idle", "jump", "jump", "idle", "idle"]  # 1 -> 1.1, 3 -> 3.3
    assert texts("idle [1s-2.5s: jump]") == ["idle", "jump", "idle", "idle", "idle"]  # 2.5 -> 2.2
    assert texts("idle [0s: wave] [2s-4s: jump] [4s: spin]") == ["wave", "wave", "jump", "jump", "spin"]
    # a span that snaps to nothing still gets its section
    assert texts("idle [2.1s-2.3s: blink]") == ["idle", "idle", "blink", "idle", "idle"]


def test_the_json_form_wins_over_brackets_and_every_section_gets_plain_text():
    spans = [PromptSpan(start=0, text="a"), PromptSpan(start=3.3, text="b")]
    assert texts("ignored [0s: x]", spans) == ["a", "a", "a", "b", "b"]
    assert texts("just this") == ["just this"] * 5


def test_the_original_model_generates_the_end_first():
    timeline = schedule("idle [0s: wave] [3.3s: spin]", None, 5, 9)
    assert [p.text for p in generation_order(timeline, Variant.FRAMEPACK_F1)] == ["wave"] * 3 + ["spin"] * 2
    assert [p.text for p in generation_order(timeline, Variant.FRAMEPACK)] == ["spin"] * 2 + ["wave"] * 3


def test_blending_moves_linearly_over_the_sections_after_a_change():
    assert blend_weights(["a", "a", "b", "b", "b"], 0) == [(t, t, 1.0) for t in "aabbb"]
    assert blend_weights(["a", "a", "b", "b", "b"], 2) == [("a", "a", 1.0), ("a", "a", 1.0), ("a", "b", 0.5),
                                                           ("a", "b", 1.0), ("b", "b", 1.0)]  # fmt: skip
    third = blend_weights(["a", "b", "b", "b"], 3)
    assert [round(w, 3) for _, _, w in third] == [1.0, 0.333, 0.667, 1.0]


def test_spans_are_validated_naming_the_field():
    with pytest.raises(ValidationError) as err:
        JobParams(prompts=[{"start": -2, "text": "x"}])
    assert err.value.errors()[0]["loc"][:3] == ("prompts", 0, "start")
    assert texts("", [PromptSpan(start=2.2, end=1, text="x")]) == ["", "", "x", "", ""]  # a backwards span: one
    with pytest.raises(ValidationError):
        JobParams(prompt_blend_sections=11)
