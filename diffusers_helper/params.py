"""The one parameter schema of a FramePack job.

Every FramePack parameter is defined here, once, with its default and range.  The web
tier validates requests with it, the Celery task re-validates what it receives, the CLI
builds it from flags and the OpenAPI document is generated from it.  This module must
not import torch: the web tier imports it.
"""

from __future__ import annotations

import secrets
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "FPS",
    "MAX_SEED",
    "CACHE_THRESHOLDS",
    "CacheMode",
    "ExtendParams",
    "JobParams",
    "LoraSpec",
    "PromptSpan",
    "ValidationError",
    "Variant",
    "bounds",
    "field_errors",
    "random_seed",
]

#: FramePack writes every video at 30 frames per second; it is not a parameter.
FPS = 30
#: Seeds are unsigned 32-bit so every client (JS included) can carry them exactly.
MAX_SEED = 2**32 - 1


class Variant(StrEnum):
    """Which FramePack transformer a job runs on."""

    #: The original FramePack I2V model: samples sections in reverse ("inverted
    #: anti-drifting") and accepts an end image.
    FRAMEPACK = "framepack"
    #: FramePack-F1: samples forward ("vanilla"); no end image.
    FRAMEPACK_F1 = "framepack-f1"


class CacheMode(StrEnum):
    """Which step cache a job runs with (:mod:`diffusers_helper.stepcache`)."""

    NONE = "none"
    #: diffusers' First Block Cache: FramePack's TeaCache idea (what ``use_teacache`` turns on).
    FIRST_BLOCK = "first_block"
    #: MagCache with FramePack's published magnitude ratios.
    MAG = "mag"


#: Each cache's threshold when a job gives none: FramePack's TeaCache 0.15 (rel-L1); MagCache's
#: FramePack demo 0.1 (accumulated error).
CACHE_THRESHOLDS = {CacheMode.FIRST_BLOCK: 0.15, CacheMode.MAG: 0.10}


#: LoRA file names: letters, digits, dot, dash, underscore; no path (the LoRA directory's files only).
LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class LoraSpec(BaseModel):
    """One LoRA of a job: a file of the LoRA directory and its weight."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=LORA_NAME, title="LoRA file", description="A file in FRAMEPACK_LORA_DIR (the "
                      ".safetensors suffix may be left out); GET /api/loras lists them.")  # fmt: skip
    weight: float = Field(1.0, ge=-4, le=4, title="Weight", description="Adapter weight (0 = off).")


class PromptSpan(BaseModel):
    """A prompt for a stretch of the video (seconds from its start; ``end`` null = until the
    next span starts, or the end).  Times snap to sections, and every span gets at least one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    start: float = Field(ge=0, le=120, title="Start (s)")
    end: float | None = Field(None, ge=0, le=120, title="End (s)")
    text: str = Field(max_length=4000, title="Prompt")


def random_seed() -> int:
    """A fresh seed from the OS's randomness (never ``torch.manual_seed(-1)``)."""
    return secrets.randbelow(MAX_SEED + 1)


class JobParams(BaseModel):
    """What a user may ask of one FramePack generation.

    ``seed`` absent or ``-1`` means "random": :meth:`with_seed` picks and records a real
    one.  ``resolution`` absent means "the profile's default bucket base" (640 for the
    real weights, small for the tiny profile): :meth:`with_resolution` fills it in.
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True, allow_inf_nan=False)

    prompt: str = Field("", title="Prompt", max_length=4000, description='What the video should show. To change it '
                        'over time, give each part a start: "[0s: a cat sits] [2s: the cat jumps]".')  # fmt: skip
    n_prompt: str = Field(
        "", title="Negative prompt", max_length=4000, description="Negative prompt; used only when cfg > 1."
    )
    seed: int | None = Field(
        None,
        title="Seed",
        ge=-1,
        le=MAX_SEED,
        description="RNG seed. Absent or -1 means random: a real seed is chosen and recorded.",
    )
    total_second_length: float = Field(
        5.0, title="Length (seconds)", ge=1, le=120, description="Video length in seconds."
    )
    latent_window_size: int = Field(
        9,
        title="Latent window size",
        ge=1,
        le=33,
        description="Latent frames per section (FramePack: should not change).",
    )
    steps: int = Field(25, title="Steps", ge=1, le=100, description="Sampling steps per section.")
    cfg: float = Field(
        1.0, title="CFG scale (real)", ge=1, le=32, description="Real CFG scale; > 1 doubles the transformer calls."
    )
    gs: float = Field(10.0, title="Distilled guidance (gs)", ge=1, le=32, description="Distilled guidance scale.")
    rs: float = Field(0.0, title="CFG re-scale (rs)", ge=0, le=1, description="CFG re-scale.")
    gpu_memory_preservation: float = Field(
        6.0,
        title="GPU memory preservation (GB)",
        ge=6,
        le=128,
        description="GB of GPU memory kept free in low-VRAM mode.",
    )
    use_teacache: bool = Field(
        True, title="Use TeaCache", description="Step cache (TeaCache idea): faster, slightly worse hands. "
        "Ignored when cache is given."
    )
    cache: CacheMode | None = Field(
        None,
        title="Step cache",
        description="none, first_block (TeaCache's idea) or mag (MagCache): skips transformer steps whose result "
        "can be predicted (faster; details may change). Absent: use_teacache decides (true = first_block).",
    )
    cache_threshold: float | None = Field(
        None,
        title="Step cache threshold",
        gt=0,
        le=1,
        description="Higher skips more. Absent: first_block 0.15, mag 0.1.",
    )
    mp4_crf: int = Field(16, title="MP4 CRF", ge=0, le=51, description="H.264 CRF of the output mp4.")
    model: Variant = Field(Variant.FRAMEPACK, title="Model", description="framepack: the original, sampled from the "
                           "end backwards (takes an end image); framepack-f1: forward, livelier motion, can be "
                           "extended.")  # fmt: skip
    resolution: int | None = Field(
        None,
        title="Resolution (bucket base)",
        ge=32,
        le=1280,
        description="Bucket base in pixels; absent means the profile's default.",
    )
    prompts: list[PromptSpan] | None = Field(
        None,
        title="Timestamped prompts",
        max_length=64,
        description="Prompts over time, [{start, end, text}] in seconds; or write "
        "'[0s: a man waves] [2s-4s: he jumps]' in the prompt (text outside brackets is the default).",
    )
    prompt_blend_sections: int = Field(
        0,
        title="Prompt blend (sections)",
        ge=0,
        le=10,
        description="Sections over which the embeddings move from one prompt to the next (0 = switch at once).",
    )
    loras: list[LoraSpec] = Field(
        default_factory=list, title="LoRAs", max_length=8, description="LoRA files and weights for this job."
    )
    end_image: str | None = Field(
        None,
        title="End image",
        description=(
            "End frame (original model only). Over HTTP an uploaded file or base64/data URL; in-process a path."
        ),
    )

    @model_validator(mode="after")
    def _end_image_needs_original_model(self) -> JobParams:
        if self.end_image is not None and self.model is Variant.FRAMEPACK_F1:
            raise ValueError(
                "end_image: the framepack-f1 model samples forward and cannot take an end image; use model=framepack"
            )
        return self

    @model_validator(mode="after")
    def _prompt_times_inside_the_video(self) -> JobParams:
        """A timestamp must fall inside the video (``[99999s: x]`` used to fail on the worker)."""
        from .prompts import parse

        field, spans = "prompts", self.prompts
        if not spans:
            field = "prompt"
            try:
                spans = parse(self.prompt)[1]
            except ValidationError as exc:
                raise ValueError(f"prompt: a timestamp is out of range ({field_errors(exc)[0]['message']})") from None
        for span in spans:
            if span.start >= self.total_second_length:
                raise ValueError(f"{field}: the prompt starting at {span.start:g} s starts after the video ends "
                                 f"(total_second_length is {self.total_second_length:g} s)")  # fmt: skip
        return self

    @property
    def cache_mode(self) -> CacheMode:
        """The step cache this job runs with: ``cache`` when given, else ``use_teacache``'s."""
        if self.cache is not None:
            return self.cache
        return CacheMode.FIRST_BLOCK if self.use_teacache else CacheMode.NONE

    @property
    def cache_threshold_or_default(self) -> float | None:
        mode = self.cache_mode
        if mode is CacheMode.NONE:
            return None
        return self.cache_threshold if self.cache_threshold is not None else CACHE_THRESHOLDS[mode]

    @property
    def seed_is_random(self) -> bool:
        return self.seed is None or self.seed == -1

    def with_seed(self) -> JobParams:
        """A copy whose seed is concrete (a random one when absent or -1)."""
        if not self.seed_is_random:
            return self
        return self.model_copy(update={"seed": random_seed()})

    def with_resolution(self, default: int) -> JobParams:
        """A copy whose resolution is concrete (the profile's default when absent)."""
        if self.resolution is not None:
            return self
        return self.model_copy(update={"resolution": default})

    def public_dict(self) -> dict[str, Any]:
        """JSON-ready parameters, without the end image payload (only whether there is one)."""
        data = self.model_dump(mode="json", exclude={"end_image"})
        data["has_end_image"] = self.end_image is not None
        return data


class ExtendParams(BaseModel):
    """How to extend a finished video (``POST /api/jobs/<id>/extend``): the F1 model
    continues it forward from its last checkpoint, with its other parameters unchanged."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seconds: float = Field(ge=1, le=120, title="Seconds to add", description="Length of the continuation.")
    prompt: str | None = Field(None, max_length=4000, title="Prompt", description="The continuation's prompt "
                               "(timestamps count from where the video ended); absent: the original's.")  # fmt: skip
    prompts: list[PromptSpan] | None = Field(None, max_length=64, title="Timestamped prompts")
    prompt_blend_sections: int | None = Field(None, ge=0, le=10, title="Prompt blend (sections)")


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Flatten a pydantic error into ``[{"field": ..., "message": ...}]`` for API replies.

    Model-level errors (such as the end image with F1) name their field at the start of
    the message ("end_image: ..."), which is lifted into ``field`` here.
    """
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "finite_number":
            msg = "not a number (NaN and infinity are refused)"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if not loc and ":" in msg:
            loc, _, msg = msg.partition(":")
            msg = msg.strip()
        out.append({"field": loc or "body", "message": msg})
    return out


def bounds(model: type[BaseModel], name: str) -> tuple[float, float]:
    """A field's inclusive range as its schema declares it (``ge``/``le``): for callers that
    clamp into it (the original API) instead of refusing, so the numbers live here only."""
    low = high = None
    for constraint in model.model_fields[name].metadata:
        low = getattr(constraint, "ge", low)
        high = getattr(constraint, "le", high)
    if low is None or high is None:
        raise ValueError(f"{model.__name__}.{name} declares no ge/le range")
    return low, high
