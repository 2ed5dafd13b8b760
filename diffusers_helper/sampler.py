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


@dataclass
class SectionState:
    """What a finished section leaves for the next one: enough to continue exactly."""

    done: int  # sections finished
    history_latents: torch.Tensor  # float32, FramePack's clean-latent history
    generated_latent_frames: int
    generator_state: torch.Tensor  # torch.Generator.get_state() after the last section
    history_video: torch.Tensor | None = field(default=None, repr=False)  # decoded so far (not checkpointed)


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
        channels = self.pipe.transformer.config.in_channels
        h, w = self.height // self.pipe.vae_scale_factor_spatial, self.width // self.pipe.vae_scale_factor_spatial
        sizes = HISTORY_ORIGINAL if self.inverted else HISTORY_F1
        history = torch.zeros(1, channels, sum(sizes), h, w, device=self.device, dtype=torch.float32)
        generated = 0
        if not self.inverted:  # F1 continues forward from the start image
            history = torch.cat([history, self.image_latents], dim=2)
            generated = 1
        return SectionState(0, history, generated, self.generator.get_state())

    # -- one section ----------------------------------------------------------------------------
    def _layout(self, k: int) -> dict[str, Any]:
        """The clean latents and frame indices the transformer sees in section ``k`` (0-based)."""
        history = self.state.history_latents
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
        pipe, state = self.pipe, self.state
        last = state.done == self.sections - 1
        if self.inverted:
            if last:
                latents = torch.cat([self.image_latents, latents], dim=2)
            generated = state.generated_latent_frames + latents.shape[2]
            history = torch.cat([latents, state.history_latents], dim=2)
            real = history[:, :, :generated]
            decode = real[:, :, : (self.lws * 2 + 1) if last else self.lws * 2]
        else:
            generated = state.generated_latent_frames + latents.shape[2]
            history = torch.cat([state.history_latents, latents], dim=2)
            real = history[:, :, -generated:]
            decode = real[:, :, -self.lws * 2 :]
        vae = pipe.vae
        if state.history_video is None:
            video = vae.decode(real.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        else:
            overlap = (self.lws - 1) * pipe.vae_scale_factor_temporal + 1
            current = vae.decode(decode.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            video = (pipe._soft_append(current, state.history_video, overlap) if self.inverted
                     else pipe._soft_append(state.history_video, current, overlap))  # fmt: skip
        self.state = SectionState(state.done + 1, history, generated, self.generator.get_state(), video)
        return video
