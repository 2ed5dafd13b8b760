"""Prompts that change over time: FramePack-Studio's syntax, resolved to one prompt per section.

    "a man stands [0s: a man waves] [2s-4s: he jumps] [4s: he spins]"

Text outside brackets is the default prompt; ``[Ts: text]`` starts at T seconds and runs to
the next start, ``[Ts-Us: text]`` ends at U (the default, or a covering earlier span, takes
over again).  The JSON form is ``prompts: [{"start": 0, "end": null, "text": ...}]``.
Times snap to the nearest section boundary; a section lasts ``(latent_window_size * 4 - 3)
/ 30`` seconds, as in FramePack-Studio.  The original model generates the end of the video
first, so its generation order is the time order reversed (``[2s: ...]`` still means two
seconds into the video); F1 generates forward.  Torch-free: the web tier validates with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .params import FPS, PromptSpan, Variant

_SPAN = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*s?\s*(?:-\s*(\d+(?:\.\d+)?)\s*s?\s*)?:\s*([^\]]*?)\s*\]")


def section_seconds(latent_window_size: int) -> float:
    """The length of one section on FramePack-Studio's clock (1.1 s at the default 9)."""
    return (latent_window_size * 4 - 3) / FPS


def parse(prompt: str) -> tuple[str, list[PromptSpan]]:
    """``"default [0s: a] [2s-4s: b]"`` -> ``("default", [spans])``; no brackets -> no spans."""
    spans = [PromptSpan(start=float(a), end=float(b) if b else None, text=text)
             for a, b, text in _SPAN.findall(prompt)]  # fmt: skip
    default = " ".join(_SPAN.sub(" ", prompt).split())
    return default, spans


@dataclass(frozen=True)
class SectionPrompt:
    """The prompt of one section, in time order (``section`` 1 = the start of the video)."""

    section: int
    start: float
    end: float
    text: str


def schedule(
    prompt: str, spans: list[PromptSpan] | None, sections: int, latent_window_size: int
) -> list[SectionPrompt]:
    """One prompt per section, in time order.  ``spans`` (the JSON form) wins over brackets
    in ``prompt``; with neither, every section gets ``prompt``."""
    default, parsed = parse(prompt)
    spans = sorted(spans if spans else parsed, key=lambda s: s.start)
    if not spans:
        default = prompt
    length = section_seconds(latent_window_size)
    texts = [default] * sections
    for i, span in enumerate(spans):
        first = round(span.start / length)
        if span.end is not None:
            last = round(span.end / length)
        elif i + 1 < len(spans):
            last = round(spans[i + 1].start / length)
        else:
            last = sections
        for t in range(max(first, 0), min(max(last, first + 1), sections)):  # every span gets a section
            texts[t] = span.text
    return [SectionPrompt(t + 1, round(t * length, 3), round((t + 1) * length, 3), texts[t]) for t in range(sections)]


def generation_order(prompts: list[SectionPrompt], variant: Variant) -> list[SectionPrompt]:
    """The sections in the order the model generates them (the original model: end first)."""
    return list(reversed(prompts)) if variant is Variant.FRAMEPACK else list(prompts)


def blend_weights(texts: list[str], blend_sections: int) -> list[tuple[str, str, float]]:
    """For each generated section ``(previous, current, alpha)``, in generation order: at a
    change of prompt the embeddings move linearly from the previous prompt's to the new
    one's over ``blend_sections`` sections, ``alpha = (i - change + 1) / blend_sections``
    (FramePack-Studio's rule: the last of them is the new prompt alone); 0 switches at once.
    ``alpha`` 1 means "``current`` only"."""
    out: list[tuple[str, str, float]] = []
    previous, change = texts[0] if texts else "", 0
    for i, text in enumerate(texts):
        if i > 0 and text != texts[i - 1]:
            previous, change = texts[i - 1], i
        if blend_sections > 0 and change > 0 and i - change < blend_sections:
            out.append((previous, text, (i - change + 1) / blend_sections))
        else:
            out.append((text, text, 1.0))
    return out
