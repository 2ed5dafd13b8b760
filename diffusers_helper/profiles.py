"""Model profiles: where the weights come from, and loading them once.

A profile names four sources: the HunyuanVideo base (text encoders, tokenizers, VAE,
scheduler), the SigLIP image encoder and one FramePack transformer per variant.

- ``tiny``: built once with seeded random weights (:mod:`diffusers_helper.tiny`), saved
  in the local-directory layout below, then loaded like any local directory.
- ``hf``: the real Hugging Face repos, resolved through the Hugging Face cache (set
  ``HF_HUB_OFFLINE=1`` on machines that must not download).
- a directory path: a local copy laid out as ``base/``, ``image_encoder/``,
  ``framepack/`` and ``framepack-f1/``.

All three load through the same ``from_pretrained`` calls in :class:`Models`.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import Variant
from .tiny import TINY_RESOLUTION, ensure_tiny

log = logging.getLogger(__name__)

#: Real Hugging Face repo ids (facts, section 3).
HF_BASE = "hunyuanvideo-community/HunyuanVideo"
HF_IMAGE_ENCODER = "lllyasviel/flux_redux_bfl"
HF_TRANSFORMERS = {
    Variant.FRAMEPACK: "lllyasviel/FramePackI2V_HY",
    Variant.FRAMEPACK_F1: "lllyasviel/FramePack_F1_I2V_HY_20250503",
}
#: Above this much free GPU memory everything stays on the GPU (FramePack's own rule).
HIGH_VRAM_GB = 60.0


class ModelNotFoundError(RuntimeError):
    """Weights are missing; the message names the repo and how to get it."""


@dataclass(frozen=True)
class Profile:
    name: str
    base: str
    image_encoder: str
    transformers: dict[Variant, str]
    default_resolution: int
    #: True for the tiny profile: its videos are noise by design.
    is_noise: bool = False
    description: str = ""

    def public_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "variants": [v.value for v in self.transformers],
            "default_resolution": self.default_resolution,
            "is_noise": self.is_noise,
            "description": self.description,
        }


def local_profile(directory: str | Path, name: str | None = None) -> Profile:
    d = Path(directory).expanduser().resolve()
    return Profile(
        name=name or f"dir:{d}",
        base=str(d / "base"),
        image_encoder=str(d / "image_encoder"),
        transformers={v: str(d / v.value) for v in Variant},
        default_resolution=640,
        description=f"local weights in {d}",
    )


def resolve_profile(spec: str = "tiny", cache_dir: str | Path | None = None) -> Profile:
    """``tiny`` | ``hf`` | a directory -> :class:`Profile` (building the tiny one if needed)."""
    if spec == "tiny":
        d = ensure_tiny(Path(cache_dir) if cache_dir else None)
        p = local_profile(d, name="tiny")
        return Profile(
            name="tiny",
            base=p.base,
            image_encoder=p.image_encoder,
            transformers=p.transformers,
            default_resolution=TINY_RESOLUTION,
            is_noise=True,
            description="tiny random weights: the videos are noise (real pipeline, fake model)",
        )
    if spec == "hf":
        return Profile(
            name="hf",
            base=HF_BASE,
            image_encoder=HF_IMAGE_ENCODER,
            transformers=dict(HF_TRANSFORMERS),
            default_resolution=640,
            description="real FramePack weights from the Hugging Face cache",
        )
    if Path(spec).expanduser().is_dir():
        return local_profile(spec)
    raise ValueError(f"unknown model profile {spec!r}: use 'tiny', 'hf' or an existing directory")


def _allow_download() -> bool:
    """Workers never start a 30 GB download inside a job unless told to.

    Weights come from the Hugging Face cache (``local_files_only``); set
    ``FRAMEPACK_ALLOW_DOWNLOAD=1`` to let the first load fetch them.  Being explicit also
    sidesteps a diffusers trap: sharded checkpoints ignore ``HF_HUB_OFFLINE`` and ask the
    hub for the file list unless ``local_files_only`` is passed.
    """
    return os.environ.get("FRAMEPACK_ALLOW_DOWNLOAD", "") in ("1", "true", "yes")


def _load(cls: Any, repo: str, subfolder: str | None = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with a readable error when the weights are not there."""
    kwargs.setdefault("local_files_only", not _allow_download())
    try:
        if subfolder:
            return cls.from_pretrained(repo, subfolder=subfolder, **kwargs)
        return cls.from_pretrained(repo, **kwargs)
    except (OSError, ValueError) as exc:
        where = f"{repo} (subfolder {subfolder})" if subfolder else repo
        if Path(repo).is_absolute() or repo.startswith("."):
            hint = "check the directory layout (base/, image_encoder/, framepack/, framepack-f1/)"
        else:
            hint = (
                f"download it first with `hf download {repo}` (about 30 GB for all FramePack "
                "repos), or point the profile at a local copy"
            )
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"model weights not found: {where}; {hint}. ({first_line})") from None


def _quiet_loading() -> None:
    """Loading progress bars and tokenizer warnings would drown the job's own log."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


@dataclass
class Placement:
    """Device and dtypes for this machine, and whether to offload."""

    device: str
    dtype: Any  # transformer dtype
    component_dtype: Any  # text encoders, VAE, image encoder
    low_vram: bool = False
    free_gb: float | None = None

    @classmethod
    def detect(cls) -> Placement:
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            free_gb = free / 2**30
            bf16 = torch.cuda.is_bf16_supported()
            return cls(
                device="cuda",
                dtype=torch.bfloat16 if bf16 else torch.float16,
                component_dtype=torch.float16,
                low_vram=free_gb < HIGH_VRAM_GB,
                free_gb=free_gb,
            )
        return cls(device="cpu", dtype=torch.float32, component_dtype=torch.float32)


@dataclass
class Models:
    """The loaded models of one profile: shared components once, transformers on demand.

    One instance per worker process.  :meth:`pipeline` returns a ready
    ``HunyuanVideoFramepackPipeline`` for a variant; its transformer loads on first use
    and stays loaded, unless GPU memory is short, when only the variant in use stays.
    """

    profile: Profile
    placement: Placement = field(default_factory=Placement.detect)
    _shared: dict[str, Any] | None = None
    _transformers: dict[Variant, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load_shared(self) -> dict[str, Any]:
        if self._shared is not None:
            return self._shared
        from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
        from transformers import (
            CLIPTextModel,
            CLIPTokenizer,
            LlamaModel,
            LlamaTokenizerFast,
            SiglipImageProcessor,
            SiglipVisionModel,
        )

        _quiet_loading()
        p, dt = self.profile, self.placement.component_dtype
        log.info("loading shared components of profile %s (%s)", p.name, p.description)
        shared = dict(
            text_encoder=_load(LlamaModel, p.base, "text_encoder", torch_dtype=dt),
            tokenizer=_load(LlamaTokenizerFast, p.base, "tokenizer"),
            text_encoder_2=_load(CLIPTextModel, p.base, "text_encoder_2", torch_dtype=dt),
            tokenizer_2=_load(CLIPTokenizer, p.base, "tokenizer_2"),
            vae=_load(AutoencoderKLHunyuanVideo, p.base, "vae", torch_dtype=dt),
            scheduler_config=_load(FlowMatchEulerDiscreteScheduler, p.base, "scheduler").config,
            feature_extractor=_load(SiglipImageProcessor, p.image_encoder, "feature_extractor"),
            image_encoder=_load(SiglipVisionModel, p.image_encoder, "image_encoder", torch_dtype=dt),
        )
        for name in ("text_encoder", "text_encoder_2", "vae", "image_encoder"):
            shared[name].eval().requires_grad_(False)
        if not self.placement.low_vram:
            for name in ("text_encoder", "text_encoder_2", "vae", "image_encoder"):
                shared[name].to(self.placement.device)
        self._shared = shared
        return shared

    def transformer(self, variant: Variant) -> Any:
        if variant in self._transformers:
            return self._transformers[variant]
        from diffusers import HunyuanVideoFramepackTransformer3DModel

        if self.placement.low_vram and self._transformers:
            log.info("GPU memory is short: unloading %s", [v.value for v in self._transformers])
            self._transformers.clear()
            gc.collect()
            import torch

            torch.cuda.empty_cache()
        log.info("loading transformer %s from %s", variant.value, self.profile.transformers[variant])
        t = _load(
            HunyuanVideoFramepackTransformer3DModel,
            self.profile.transformers[variant],
            torch_dtype=self.placement.dtype,
        )
        t.eval().requires_grad_(False)
        if not self.placement.low_vram:
            t.to(self.placement.device)
        self._transformers[variant] = t
        return t

    @property
    def loaded_variants(self) -> list[str]:
        return [v.value for v in self._transformers]

    def pipeline(self, variant: Variant, gpu_memory_preservation: float = 6.0) -> Any:
        """A pipeline for ``variant`` sharing the loaded components (cheap to build)."""
        from diffusers import HunyuanVideoFramepackPipeline

        from .observe import X0Scheduler

        with self._lock:
            shared = self.load_shared()
            transformer = self.transformer(variant)
        pipe = HunyuanVideoFramepackPipeline(
            text_encoder=shared["text_encoder"],
            tokenizer=shared["tokenizer"],
            transformer=transformer,
            vae=shared["vae"],
            scheduler=X0Scheduler.from_config(shared["scheduler_config"]),
            text_encoder_2=shared["text_encoder_2"],
            tokenizer_2=shared["tokenizer_2"],
            image_encoder=shared["image_encoder"],
            feature_extractor=shared["feature_extractor"],
        )
        pipe.set_progress_bar_config(disable=True)
        if self.placement.low_vram:
            self._apply_low_vram(pipe, transformer, gpu_memory_preservation)
        return pipe

    def _apply_low_vram(self, pipe: Any, transformer: Any, preserve_gb: float) -> None:
        """diffusers' own offloading: stream the transformer's blocks when it does not fit
        in (free - preserve_gb), move the other models to the GPU only while they run, and
        decode the VAE in tiles."""
        import torch

        free_gb = torch.cuda.mem_get_info()[0] / 2**30
        t_gb = sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**30
        if t_gb > free_gb - preserve_gb and not getattr(transformer, "_framepack_group_offload", False):
            transformer.enable_group_offload(
                onload_device=torch.device("cuda"),
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
            transformer._framepack_group_offload = True
            pipe._exclude_from_cpu_offload.append("transformer")
        pipe.enable_model_cpu_offload()
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
