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
    """Flow-matching Euler that remembers the x0 prediction of its last step."""

    x0: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.x0 = sample.float() - sigma * model_output.float()
        return super().step(model_output, timestep, sample, *args, **kwargs)


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
