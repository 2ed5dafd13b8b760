"""Typed events that :func:`diffusers_helper.generate.generate` emits (torch-free).

A consumer (the CLI's progress bars, the Celery task's ``update_state``) receives them in
order: stages, then per step a :class:`PreviewReady` and a :class:`Progress`, and a
:class:`SectionDone` after every section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: FramePack's stage texts, in the order they happen.
STAGE_STARTING = "Starting ..."
STAGE_TEXT = "Text encoding ..."
STAGE_IMAGE = "Image processing ..."
STAGE_VAE = "VAE encoding ..."
STAGE_CLIP = "CLIP Vision encoding ..."
STAGE_SAMPLING = "Start sampling ..."
STAGE_LOADING = "Loading model ..."


@dataclass(frozen=True)
class Stage:
    text: str


@dataclass(frozen=True)
class Progress:
    """Overall progress across all sections (0..1), with section k/N and step s/S (1-based)."""

    progress: float
    section: int
    sections: int
    step: int
    steps: int
    eta_seconds: float | None
    elapsed_seconds: float
    #: The prompt this section samples with (timestamped prompts change it between sections).
    prompt: str | None = None

    @property
    def message(self) -> str:
        return f"Sampling {self.step}/{self.steps} · section {self.section}/{self.sections}"


@dataclass(frozen=True)
class Preview:
    """One JPEG strip of ``frames`` tiles laid side by side, each ``tile_width`` x ``tile_height``."""

    jpeg: bytes
    frames: int
    tile_width: int
    tile_height: int


@dataclass(frozen=True)
class PreviewReady:
    preview: Preview
    section: int
    step: int


@dataclass(frozen=True)
class SectionDone:
    """The whole video so far has been written to ``path`` (complete file, atomically)."""

    section: int
    sections: int
    path: Path
    frames: int
    seconds: float

    @property
    def message(self) -> str:
        return f"Total generated frames: {self.frames}, Video length: {self.seconds:.2f} seconds (FPS-30)"


@dataclass(frozen=True)
class Resumed:
    """A redelivered job continues after ``section`` of ``sections`` (restored from its
    checkpoint, not sampled again)."""

    section: int
    sections: int

    @property
    def message(self) -> str:
        return f"Resumed after section {self.section}/{self.sections} (restored from its checkpoint)"


Event = Stage | Progress | PreviewReady | SectionDone | Resumed
