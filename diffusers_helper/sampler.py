"""FramePack's section loop, run by us on diffusers' components.

diffusers' ``HunyuanVideoFramepackPipeline.__call__`` encodes one prompt and runs every
section inside one call.  What this service needs lives *between* sections: a prompt per
section (timestamped prompts), the video so far after each section, and the state a
section leaves behind (the latent history and the generator), to checkpoint it, resume
after a lost worker or extend a finished video.  So we own the loop, as FramePack's own
worker does, and keep diffusers for everything inside it: the pipeline's encoders,
``prepare_*`` helpers, scheduler, transformer, VAE and ``_soft_append``.  With one prompt
and no LoRA the loop reproduces ``pipe(...)`` exactly (same calls, same random numbers, in
the same order): ``tests/test_sampler.py`` holds it to that.

Each step computes the x0 prediction (``x_t - sigma * v``) for the preview and applies
FramePack's CFG re-scale (``rs``, which diffusers' pipeline lacks) to the guided velocity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .params import Variant

#: FramePack's released checkpoints: clean-latent history sizes (1x, 2x, 4x frames).
HISTORY_ORIGINAL = (1, 2, 16)  # inverted anti-drifting: 1x history comes first
HISTORY_F1 = (16, 2, 1)  # vanilla (forward): 4x history comes first


@dataclass
class PromptCond:
    """One prompt's conditioning, as the transformer takes it."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor

    def blend(self, other: PromptCond, alpha: float) -> PromptCond:
        """``(1 - alpha) * self + alpha * other`` (masks: the union of both)."""
        if alpha >= 1.0:
            return other
        if alpha <= 0.0:
            return self
        return PromptCond(
            embeds=torch.lerp(self.embeds, other.embeds, alpha),
            pooled=torch.lerp(self.pooled, other.pooled, alpha),
            mask=torch.maximum(self.mask, other.mask),
        )


@dataclass(frozen=True)
class Decode:
    """One VAE decode that built the video: latent frames ``[start, end)`` of the timeline,
    and how the result joined the video so far (``first``, blended ``before`` it: the
    original model, or ``after`` it: F1)."""

    start: int
    end: int
    mode: str


@dataclass
class SectionState:
    """What the finished sections leave behind: enough to continue exactly.

    ``timeline`` holds every generated latent frame in time order (the start image's
    latent included once it is part of the video).  FramePack's clean-latent history is
    ``timeline`` with the 19 empty history frames before it (F1) or after it (original),
    and the video so far is the replay of ``decodes`` on it — so neither needs storing."""

    done: int  # sections finished
    timeline: torch.Tensor  # (1, C, T, h, w) float32
    decodes: list[Decode]
    generator_state: torch.Tensor  # torch.Generator.get_state() after the last section
    history_video: torch.Tensor | None = field(default=None, repr=False)  # decoded so far (rebuilt, not stored)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG re-scale (Lin et al., "Common Diffusion Noise Schedules...", §3.4), per sample."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


#: ``on_step(section, step, x0)`` after every sampling step (1-based section and step);
#: it may raise to stop at once (cancel).
OnStep = Callable[[int, int, torch.Tensor], None]


class Sampler:
    """One job's sections on one pipeline; :meth:`run_section` runs the next one."""

    def __init__(
        self,
        pipe: Any,
        *,
        variant: Variant,
        sections: int,
        latent_window_size: int,
        steps: int,
        height: int,
        width: int,
        guidance_scale: float,
        true_cfg_scale: float,
        rescale: float,
        generator: torch.Generator,
        on_step: OnStep | None = None,
    ):
        self.pipe = pipe
        self.variant = variant
        self.sections = sections
        self.lws = latent_window_size
        self.steps = steps
        self.height, self.width = height, width
        self.cfg = true_cfg_scale
        self.rescale = rescale if true_cfg_scale > 1 else 0.0  # FramePack: rs only with real CFG
        self.generator = generator
        self.on_step = on_step or (lambda *_: None)
        self.device = pipe._execution_device
        self.dtype = pipe.transformer.dtype
        self.guidance = torch.tensor([guidance_scale], dtype=self.dtype, device=self.device) * 1000.0
        self.image_latents: torch.Tensor | None = None
        self.last_image_latents: torch.Tensor | None = None
        self.image_embeds: torch.Tensor | None = None
        self.state: SectionState | None = None

    @property
    def inverted(self) -> bool:
        """The original model samples the end of the video first ("inverted anti-drifting")."""
        return self.variant is Variant.FRAMEPACK

    # -- before the first section -----------------------------------------------------------
    def encode_images(self, image: Any, last_image: Any = None) -> None:
        """SigLIP embeddings and VAE latents of the start (and end) image; the VAE sample
        draws from the generator first, as the pipeline does."""
        pipe = self.pipe
        pixels = pipe.video_processor.preprocess(image, self.height, self.width)
        self.image_embeds = pipe.encode_image(pixels, device=self.device).to(self.dtype)
        last_pixels = None
        if last_image is not None:
            last_pixels = pipe.video_processor.preprocess(last_image, self.height, self.width)
            last_embeds = pipe.encode_image(last_pixels, device=self.device).to(self.dtype)
            self.image_embeds = (self.image_embeds + last_embeds) / 2
        encode = pipe.prepare_image_latents
        self.image_latents = encode(pixels, dtype=torch.float32, device=self.device, generator=self.generator)
        if last_pixels is not None:
            self.last_image_latents = encode(last_pixels, dtype=torch.float32, device=self.device,
                                             generator=self.generator)  # fmt: skip
        self.state = self._initial_state()

    def _initial_state(self) -> SectionState:
        # F1 continues forward from the start image; the original model ends on it
        timeline = self.image_latents[:, :, :0] if self.inverted else self.image_latents
        return SectionState(0, timeline, [], self.generator.get_state())

    @property
    def history_latents(self) -> torch.Tensor:
        """FramePack's clean-latent history: the timeline and the empty history frames."""
        timeline = self.state.timeline
        sizes = HISTORY_ORIGINAL if self.inverted else HISTORY_F1
        empty = torch.zeros(*timeline.shape[:2], sum(sizes), *timeline.shape[3:], device=timeline.device,
                            dtype=torch.float32)  # fmt: skip
        return torch.cat([timeline, empty], dim=2) if self.inverted else torch.cat([empty, timeline], dim=2)

    # -- one section ----------------------------------------------------------------------------
    def _layout(self, k: int) -> dict[str, Any]:
        """The clean latents and frame indices the transformer sees in section ``k`` (0-based)."""
        history = self.history_latents
        if self.inverted:
            sizes = HISTORY_ORIGINAL
            paddings = list(reversed(range(self.sections)))
            if self.sections > 4:
                paddings = [3] + [2] * (self.sections - 3) + [1, 0]
            padding = paddings[k] * self.lws
            indices = torch.arange(0, sum([1, padding, self.lws, *sizes]))
            prefix, _pad, window, idx_1x, idx_2x, idx_4x = indices.split([1, padding, self.lws, *sizes], dim=0)
            hist_1x, hist_2x, hist_4x = history[:, :, : sum(sizes)].split(sizes, dim=2)
            if self.last_image_latents is not None and k == 0:
                hist_1x = self.last_image_latents
        else:
            sizes = HISTORY_F1
            indices = torch.arange(0, sum([1, *sizes, self.lws]))
            prefix, idx_4x, idx_2x, idx_1x, window = indices.split([1, *sizes, self.lws], dim=0)
            hist_4x, hist_2x, hist_1x = history[:, :, -sum(sizes) :].split(sizes, dim=2)
        clean = torch.cat([self.image_latents, hist_1x], dim=2)
        return dict(
            indices_latents=window,
            latents_clean=clean.to(self.dtype),
            indices_latents_clean=torch.cat([prefix, idx_1x], dim=0),
            latents_history_2x=hist_2x.to(self.dtype),
            indices_latents_history_2x=idx_2x,
            latents_history_4x=hist_4x.to(self.dtype),
            indices_latents_history_4x=idx_4x,
        )

    def _timesteps(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import (
            calculate_shift,
            retrieve_timesteps,
        )

        scheduler = self.pipe.scheduler
        sigmas = np.linspace(1.0, 0.0, self.steps + 1)[:-1]
        seq_len = latents.shape[2] * latents.shape[3] * latents.shape[4] / self.pipe.transformer.config.patch_size**2
        mu = calculate_shift(seq_len, scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))  # fmt: skip
        timesteps, _ = retrieve_timesteps(scheduler, self.steps, self.device, sigmas=sigmas, mu=min(mu, math.log(7.0)))
        return timesteps

    def _velocity(self, latents: torch.Tensor, t: torch.Tensor, layout: dict[str, Any], cond: PromptCond,
                  negative: PromptCond | None) -> torch.Tensor:  # fmt: skip
        def call(c: PromptCond) -> torch.Tensor:
            return self.pipe.transformer(
                hidden_states=latents.to(self.dtype), timestep=t.expand(latents.shape[0]),
                encoder_hidden_states=c.embeds, encoder_attention_mask=c.mask, pooled_projections=c.pooled,
                image_embeds=self.image_embeds, guidance=self.guidance, return_dict=False, **layout,
            )[0]  # fmt: skip

        v = call(cond)
        if negative is None:
            return v
        v_neg = call(negative)
        guided = v_neg + self.cfg * (v - v_neg)
        if self.rescale > 0:
            return rescale_guidance(guided.float(), v.float(), self.rescale)
        return guided

    @torch.no_grad()
    def run_section(self, cond: PromptCond, negative: PromptCond | None = None) -> torch.Tensor:
        """Sample the next section, append it to the history; returns the whole decoded
        video so far, ``(1, 3, T, H, W)`` in [-1, 1]."""
        pipe, state = self.pipe, self.state
        k = state.done
        layout = self._layout(k)
        window_frames = (self.lws - 1) * pipe.vae_scale_factor_temporal + 1
        latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, self.height, self.width, window_frames,
                                       dtype=torch.float32, device=self.device, generator=self.generator)  # fmt: skip
        scheduler = pipe.scheduler
        for i, t in enumerate(self._timesteps(latents)):
            v = self._velocity(latents, t, layout, cond, negative)
            sigma = scheduler.sigmas[i]
            x0 = latents.float() - sigma * v.float()
            latents = scheduler.step(v.float(), t, latents, return_dict=False)[0]
            self.on_step(k + 1, i + 1, x0)
        return self._append(latents)

    def _append(self, latents: torch.Tensor) -> torch.Tensor:
        """FramePack's history update and decode: the new section is decoded and blended
        into the video so far over ``(lws - 1) * 4 + 1`` frames."""
        state = self.state
        last = state.done == self.sections - 1
        if self.inverted:  # the video grows towards its start: earlier decodes move right
            if last:
                latents = torch.cat([self.image_latents, latents], dim=2)
            timeline = torch.cat([latents, state.timeline], dim=2)
            n = latents.shape[2]
            decodes = [Decode(d.start + n, d.end + n, d.mode) for d in state.decodes]
            length = timeline.shape[2] if not decodes else (self.lws * 2 + 1 if last else self.lws * 2)
            new = Decode(0, length, "before" if decodes else "first")
        else:
            timeline = torch.cat([state.timeline, latents], dim=2)
            decodes = list(state.decodes)
            end = timeline.shape[2]
            new = Decode(end - self.lws * 2, end, "after") if decodes else Decode(0, end, "first")
        video = self._decode(timeline, new, state.history_video)
        self.state = SectionState(state.done + 1, timeline, [*decodes, new], self.generator.get_state(), video)
        return video

    def _decode(self, timeline: torch.Tensor, op: Decode, video: torch.Tensor | None) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        current = vae.decode(timeline[:, :, op.start : op.end].to(vae.dtype) / vae.config.scaling_factor,
                             return_dict=False)[0]  # fmt: skip
        if op.mode == "first":
            return current
        overlap = (self.lws - 1) * pipe.vae_scale_factor_temporal + 1
        return pipe._soft_append(current, video, overlap) if op.mode == "before" else pipe._soft_append(
            video, current, overlap)

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What continues this job exactly: tensors, and the rest as JSON-ready values."""
        tensors = {"timeline": self.state.timeline.contiguous(), "image_latents": self.image_latents,
                   "image_embeds": self.image_embeds, "generator_state": self.state.generator_state}  # fmt: skip
        if self.last_image_latents is not None:
            tensors["last_image_latents"] = self.last_image_latents
        meta = {"variant": self.variant.value, "done": self.state.done, "sections": self.sections,
                "latent_window_size": self.lws, "steps": self.steps, "height": self.height, "width": self.width,
                "decodes": [[d.start, d.end, d.mode] for d in self.state.decodes]}  # fmt: skip
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, meta

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, continue_forward: bool = False) -> int:
        """Continue from a checkpoint: the same job after its worker died, or (with
        ``continue_forward``) a new F1 job that extends a finished video of either model.
        The video so far is rebuilt by replaying its decodes; returns the sections done."""
        dev = self.device
        self.image_latents = tensors["image_latents"].to(dev)
        self.image_embeds = tensors["image_embeds"].to(dev, self.dtype)
        last = tensors.get("last_image_latents")
        self.last_image_latents = None if last is None or continue_forward else last.to(dev)
        self.generator.set_state(tensors["generator_state"])
        timeline = tensors["timeline"].to(dev)
        decodes = [Decode(*d) for d in meta["decodes"]]
        video = None
        for op in decodes:
            video = self._decode(timeline, op, video)
        done = 0 if continue_forward else meta["done"]
        self.state = SectionState(done, timeline, decodes, self.generator.get_state(), video)
        return meta["done"]
