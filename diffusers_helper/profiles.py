"""Model profiles: where the weights come from, and loading them once.

A profile names four sources: the HunyuanVideo base (text encoders, tokenizers, VAE,
scheduler), the SigLIP image encoder and one FramePack transformer per variant.

- ``tiny``: built once with seeded random weights (:mod:`diffusers_helper.tiny`), saved
  in the local-directory layout below, then loaded like any local directory.
- ``hf``: the real Hugging Face repos, resolved through the Hugging Face cache (set
  ``HF_HUB_OFFLINE=1`` on machines that must not download).
- a directory path: a local copy laid out as ``base/``, ``image_encoder/``,
  ``framepack/`` and ``framepack-f1/``.
- ``random-full``: FramePack's real architectures with random weights, built in memory on
  the GPU (:mod:`diffusers_helper.fullsize`) for GPU machines without the hub: benchmarks
  and the stack's GPU check.  Its videos are noise; it needs a CUDA GPU with ~80 GB.

The first three load through the same ``from_pretrained`` calls in :class:`Models`.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fullsize
from . import speed as speed_options
from .lora import LoraCache
from .params import Variant
from .speed import EAGER, Device, SpeedOptions
from .tiny import TINY_RESOLUTION, ensure_tiny

log = logging.getLogger(__name__)

#: Real Hugging Face repo ids (facts, section 3).
HF_BASE = "hunyuanvideo-community/HunyuanVideo"
HF_IMAGE_ENCODER = "lllyasviel/flux_redux_bfl"
HF_TRANSFORMERS = {
    Variant.FRAMEPACK: "lllyasviel/FramePackI2V_HY",
    Variant.FRAMEPACK_F1: "lllyasviel/FramePack_F1_I2V_HY_20250503",
}
#: The profile when none is named: tiny random weights (its videos are noise).
DEFAULT_PROFILE = "tiny"
#: FramePack's sizes with random weights, built in memory (GPU benchmarks without the hub).
RANDOM_FULL = "random-full"
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
    #: True for the tiny and random-full profiles: their videos are noise by design.
    is_noise: bool = False
    description: str = ""
    #: Built in memory with random weights (random-full) instead of ``from_pretrained``.
    in_memory: bool = False

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


def resolve_profile(spec: str = DEFAULT_PROFILE, cache_dir: str | Path | None = None) -> Profile:
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
    if spec == RANDOM_FULL:
        return Profile(
            name=RANDOM_FULL,
            base="(random)",
            image_encoder="(random)",
            transformers={v: "(random)" for v in Variant},
            default_resolution=640,
            is_noise=True,
            description="full-size architectures with random weights built on the GPU: the videos are noise",
            in_memory=True,
        )
    if Path(spec).expanduser().is_dir():
        return local_profile(spec)
    raise ValueError(f"unknown model profile {spec!r}: use 'tiny', 'hf', '{RANDOM_FULL}' or an existing directory")


def _load_weights(cls: Any, repo: str, subfolder: str | None = None, allow_download: bool = False,
                  **kwargs: Any) -> Any:  # fmt: skip
    """``cls.from_pretrained`` with a readable error when the weights are not there.

    Weights come from the Hugging Face cache (``local_files_only``) unless
    ``allow_download`` (``FRAMEPACK_ALLOW_DOWNLOAD=1``): a worker never starts a 30 GB
    download inside a job unless told to.  Being explicit also sidesteps a diffusers trap:
    sharded checkpoints ignore ``HF_HUB_OFFLINE`` and ask the hub for the file list unless
    ``local_files_only`` is passed."""
    kwargs.setdefault("local_files_only", not allow_download)
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
    """Device and dtypes for this machine, and whether to offload.

    ``group_offload``: ``None`` decides per job (stream the transformer's blocks when it
    does not fit in free memory minus the job's ``gpu_memory_preservation``); ``True`` or
    ``False`` forces it (tests, and operators who know their card).
    """

    device: str
    dtype: Any  # transformer dtype
    component_dtype: Any  # text encoders, VAE, image encoder
    low_vram: bool = False
    free_gb: float | None = None
    group_offload: bool | None = None

    @classmethod
    def detect(cls) -> Placement:
        import torch

        if torch.cuda.is_available():
            free_gb = cls.free_gb_now()
            bf16 = torch.cuda.is_bf16_supported()
            return cls(
                device="cuda",
                dtype=torch.bfloat16 if bf16 else torch.float16,
                component_dtype=torch.float16,
                low_vram=free_gb < HIGH_VRAM_GB,
                free_gb=free_gb,
            )
        return cls(device="cpu", dtype=torch.float32, component_dtype=torch.float32)

    @staticmethod
    def free_gb_now() -> float:
        """Free GPU memory in GiB as the driver reports it (other processes included)."""
        import torch

        return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else float("inf")


#: GPU memory a 640-bucket job needs beside a resident transformer (sampling and the tiled
#: VAE decode peaked 2.6 GB above it on an H200: docs/benchmarks.md, "GPU").
ACTIVATION_MARGIN_GB = 3.0


def transformer_fits(model_gb: float, budget_gb: float) -> bool:
    """FramePack's rule: the transformer may use the free memory minus what the job asks to
    keep free (``budget_gb``); if it does not fit with room to sample, its blocks stream
    from CPU memory instead."""
    return model_gb + ACTIVATION_MARGIN_GB <= budget_gb


#: The small components (well under 1 GB each), moved to the GPU only while they run in
#: low-VRAM mode, in the order the pipeline runs them.
OFFLOADED_COMPONENTS = ("text_encoder_2", "image_encoder", "vae")


def _size_gb(module: Any) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


def _streamed(module: Any) -> bool:
    return bool(getattr(module, "_framepack_group_offload", False))


def _stream(module: Any, device: Any) -> None:
    """diffusers' block-level group offloading: one block at a time on the GPU, the next one
    copied from pinned CPU memory on a side stream while this one computes.  Pinning is
    paid once (about 33 s for the 24 GB transformer on an H200 host) and the module stays
    streamed for the life of the worker (diffusers has no public way to undo it)."""
    import torch
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)
    module.to("cpu")
    if hasattr(module, "enable_group_offload"):
        module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                    offload_type="block_level", num_blocks_per_group=1,
                                    use_stream=device.type == "cuda")  # fmt: skip
    else:  # transformers' models (the Llama text encoder)
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1,
                               use_stream=device.type == "cuda")  # fmt: skip
    module._framepack_group_offload = True


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
    #: The LoRA adapters loaded into the transformers (per job: only that job's are active).
    loras: LoraCache = field(default_factory=LoraCache)
    #: Speed options applied to every transformer once it is loaded and placed (resolved
    #: and checked by :meth:`set_speed`; eager until then).
    speed: SpeedOptions = EAGER
    #: MagCache ratios per variant name, when calibrated for these weights (else FramePack's).
    mag_ratios: dict[str, list[float]] = field(default_factory=dict)
    #: Fetch missing weights from the hub (``FRAMEPACK_ALLOW_DOWNLOAD``); else the cache only.
    allow_download: bool = False

    def set_speed(self, requested: SpeedOptions) -> SpeedOptions:
        """Resolve ``auto`` for this machine, check (``SpeedOptionError``), and apply to the
        transformers loaded so far (and to those loaded later)."""
        device = Device.of(self.placement)
        resolved = speed_options.resolve(requested, device)
        speed_options.check(resolved, device)
        self.speed = resolved
        for t in self._transformers.values():
            speed_options.apply(t, resolved)
        return resolved

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
        if p.in_memory:
            self._shared = self._build_in_memory(lambda device: fullsize.build_shared(device, dt))
            return self._shared
        _load = functools.partial(_load_weights, allow_download=self.allow_download)
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
        if self.profile.in_memory:
            t = self._build_in_memory(lambda device: fullsize.build_transformer(device, self.placement.dtype))
        else:
            t = _load_weights(
                HunyuanVideoFramepackTransformer3DModel,
                self.profile.transformers[variant],
                allow_download=self.allow_download,
                torch_dtype=self.placement.dtype,
            )
            t.eval().requires_grad_(False)
        if not self.placement.low_vram:
            t.to(self.placement.device)
        speed_options.apply(t, self.speed)
        self._transformers[variant] = t
        return t

    def _build_in_memory(self, build: Any) -> Any:
        """Random-full components are built where they run: on the GPU (on the CPU in fp32
        the transformer alone would take 52 GB), or on the CPU first in low-VRAM mode."""
        if self.placement.device != "cuda":
            raise ModelNotFoundError(f"the {RANDOM_FULL} profile needs a CUDA GPU (~80 GB); this worker runs on "
                                     f"the {self.placement.device}: use the tiny profile here")  # fmt: skip
        return build("cpu" if self.placement.low_vram else "cuda")

    @property
    def loaded_variants(self) -> list[str]:
        return [v.value for v in self._transformers]

    def pipeline(self, variant: Variant, gpu_memory_preservation: float = 6.0) -> Any:
        """A pipeline for ``variant`` sharing the loaded components (cheap to build)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline

        with self._lock:
            shared = self.load_shared()
            transformer = self.transformer(variant)
        pipe = HunyuanVideoFramepackPipeline(
            text_encoder=shared["text_encoder"],
            tokenizer=shared["tokenizer"],
            transformer=transformer,
            vae=shared["vae"],
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(shared["scheduler_config"]),
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
        """Low-VRAM mode: keep ``preserve_gb`` of the free GPU memory free, FramePack's way,
        with diffusers' and accelerate's tools.

        - The text encoder (Llama, 14 GB) always streams its layers (:func:`_stream`): it runs
          once per job, and moving it whole cost 14-16 s per job (unpinned copies at ~1 GB/s)
          and broke the preservation of small budgets (measured: docs/benchmarks.md).
        - The transformer stays on the GPU for the job, and for later jobs, when it fits in
          the free memory minus ``preserve_gb``; otherwise it streams.  Moving it whole in
          and out around every section's VAE decode cost ~20 s per section (measured).
        - The small models move to the GPU only while they run (accelerate's hooks, the
          ones ``enable_model_cpu_offload`` installs; that method refuses pipelines with a
          group-offloaded component, so the chain is built here).
        - The VAE decodes in tiles and slices.

        ``Placement.group_offload`` forces streaming of both large models on, or off (then
        the text encoder moves whole while it runs and the transformer stays resident).
        """
        import torch
        from accelerate import cpu_offload_with_hook
        from accelerate.hooks import remove_hook_from_module

        device = torch.device(self.placement.device)
        force = self.placement.group_offload
        chain = list(OFFLOADED_COMPONENTS)
        if not _streamed(pipe.text_encoder):
            if force is False:
                chain.insert(0, "text_encoder")  # moved whole while it runs
            else:
                _stream(pipe.text_encoder, device)
        for name in chain:  # hooks of the previous job's pipeline go; everything back to the CPU
            remove_hook_from_module(getattr(pipe, name), recurse=True)
            getattr(pipe, name).to("cpu")

        if not _streamed(transformer):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t_gb = _size_gb(transformer)
            on_device = next(transformer.parameters()).device.type == device.type
            budget = self.placement.free_gb_now() + (t_gb if on_device else 0.0) - preserve_gb
            stream = force if force is not None else not transformer_fits(t_gb, budget)
            if stream:
                _stream(transformer, device)
                log.info("transformer (%.1f GB) streams its blocks: %.1f GB may be used (free minus %.0f GB)",
                         t_gb, budget, preserve_gb)  # fmt: skip
            else:
                remove_hook_from_module(transformer, recurse=True)
                transformer.to(device)
        hook = None
        for name in chain:
            _, hook = cpu_offload_with_hook(getattr(pipe, name), device, prev_module_hook=hook)
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
