"""Seeing inside diffusers' FramePack pipeline without forking it.

Two things the pipeline does not hand out:

- **x0 per step.**  ``callback_on_step_end`` receives x_{t-1}, not the x0 prediction a
  preview should show.  :class:`X0Scheduler` is the pipeline's own flow-matching Euler
  scheduler that also keeps ``x0 = x_t - sigma_t * v`` of its last step, computed from
  the exact (guided, float32) velocity the pipeline passed in.
- **The video after each section.**  The pipeline decodes every section and blends it
  into its history internally, returning frames only at the end.  :func:`tap_sections`
  wraps ``vae.decode`` (the first section's history) and ``_soft_append`` (every later
  history) for the length of one call and hands each whole-video-so-far to a callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class X0Scheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler that remembers the x0 prediction of its last step.

    It also applies FramePack's CFG re-scale (``rs``), which diffusers' pipeline lacks: with
    ``rescale`` > 0 and the conditional prediction of the step in ``cond_output`` (see
    :func:`capture_cond_output`), the guided velocity is pulled towards the conditional
    one's standard deviation, ``rs * v * std(v_cond) / std(v) + (1 - rs) * v``.
    """

    x0: torch.Tensor | None = None
    rescale: float = 0.0
    cond_output: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.rescale > 0 and self.cond_output is not None:
            model_output = rescale_guidance(model_output.float(), self.cond_output.float(), self.rescale)
        sigma = self.sigmas[self.step_index]
        self.x0 = sample.float() - sigma * model_output.float()
        return super().step(model_output, timestep, sample, *args, **kwargs)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG re-scale (Lin et al., "Common Diffusion Noise Schedules...", §3.4), per sample."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


@contextmanager
def capture_cond_output(pipe: Any, calls_per_step: int) -> Iterator[None]:
    """Hand the scheduler each step's conditional prediction (the first of its
    ``calls_per_step`` transformer calls: the pipeline runs cond, then uncond)."""
    count = [0]

    def hook(_module: Any, _args: Any, output: Any) -> None:
        if count[0] % calls_per_step == 0:
            pipe.scheduler.cond_output = (output[0] if isinstance(output, tuple) else output.sample).detach()
        count[0] += 1

    handle = pipe.transformer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        pipe.scheduler.cond_output = None


@contextmanager
def tap_sections(pipe: Any, on_history: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``on_history(video)`` with the decoded video so far after every section.

    ``video`` is ``(1, 3, T, H, W)`` in [-1, 1], exactly the pipeline's own history.
    """
    vae = pipe.vae
    original_decode = vae.decode
    original_append = pipe._soft_append
    first = [True]

    def decode(*args: Any, **kwargs: Any) -> Any:
        out = original_decode(*args, **kwargs)
        if first[0]:
            first[0] = False
            on_history(out[0] if isinstance(out, tuple) else out.sample)
        return out

    def soft_append(*args: Any, **kwargs: Any) -> torch.Tensor:
        history = original_append(*args, **kwargs)
        on_history(history)
        return history

    vae.decode = decode
    pipe._soft_append = soft_append
    try:
        yield
    finally:
        del vae.decode  # drop the instance attribute; the class method shows again
        del pipe._soft_append
