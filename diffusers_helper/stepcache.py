"""Step caches: skip the transformer's blocks on steps whose result can be predicted.

Two kinds, both diffusers' own hooks (``transformer.enable_cache``):

- ``first_block`` — FramePack's TeaCache idea as diffusers' First Block Cache: the first
  block always runs, and when its output residual moved less than ``threshold`` (relative
  L1) since the last computed step the remaining blocks reuse the cached residual.
- ``mag`` — MagCache (Ma et al., 2025): per-step magnitude ratios of the blocks' residual,
  measured once per model, predict the error of reusing the last residual; steps are
  skipped while the accumulated error stays under ``threshold`` (at most
  :data:`MAG_MAX_SKIP_STEPS` in a row, never in the first :data:`MAG_RETENTION` of a
  section's steps).  The ratios are the authors' published ones for FramePack
  (:data:`FRAMEPACK_MAG_RATIOS`); :class:`StepCache` with ``calibrate=True`` measures
  them for another model (``framepack calibrate``).

diffusers' FramePack pipeline does not open the ``cache_context`` the cache hooks need,
and we own the section loop anyway, so :class:`StepCache` opens one around every
transformer call, with a separate state for the conditional and the unconditional call
when real CFG runs (comparing one with the other would make the cache skip on nonsense).
It also counts calls and skips, for the result and the sidecar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: MagCache's magnitude ratios for FramePack at 25 steps (the first step has none: 1.0).
#: Source: Zehong-Ma/MagCache, MagCache4FramePack/magcache_demo_gradio.py and
#: magcache_demo_gradio_f1.py (``initialize_magcache``): the authors ship the same curve for
#: FramePack and FramePack-F1.  Other step counts use the nearest ratio (as diffusers does).
FRAMEPACK_MAG_RATIOS: tuple[float, ...] = (
    1.0, 1.25781, 1.08594, 1.02344, 1.00781, 1.02344, 1.00781, 1.02344, 1.05469, 0.99609, 1.03906, 1.00781, 1.01562,
    1.00781, 1.02344, 1.01562, 0.98047, 1.05469, 0.98047, 0.96875, 1.03125, 0.97266, 0.9375, 0.96484, 0.78516,
)  # fmt: skip
#: The authors' FramePack demo defaults: at most 2 skipped steps in a row, none in the first 20 %.
MAG_MAX_SKIP_STEPS = 2
MAG_RETENTION = 0.2


class StepCache:
    """Context manager: enable the step cache (if asked) and count calls and skips.

    A skipped call never runs the last block's own ``forward`` (the cache hook returns
    the cached residual instead), so a wrapper around that ``forward``, installed before
    the cache hooks (which then call it as "the original"), counts the calls that really
    computed every block.  It sits outside any compiled code, so compiled blocks
    (:mod:`diffusers_helper.speed`) neither see it nor recompile for it.

    ``calibrate``: no skipping; record MagCache's ratio ``mean(|r_t| / |r_{t-1}|)`` of the
    blocks' residual ``r`` (last block's output minus first block's input, per token) at
    every step of every section (conditional calls only): :meth:`ratios`.
    """

    def __init__(self, transformer: Any, mode: str, threshold: float, steps: int, calls_per_step: int = 1,
                 mag_ratios: Sequence[float] | None = None, calibrate: bool = False):  # fmt: skip
        self.transformer = transformer
        self.mode = "none" if calibrate else mode
        self.threshold = threshold
        self.steps = steps
        self.calls_per_step = calls_per_step
        self.mag_ratios = tuple(mag_ratios or FRAMEPACK_MAG_RATIOS)
        self.calibrate = calibrate
        self.calls = 0
        self.full = 0
        self._context: Any = None
        self._handles: list[Any] = []
        self._wrapped: list[tuple[Any, Any]] = []
        self._first_input: Any = None
        self._previous: Any = None
        self._measured: list[list[float]] = [[] for _ in range(steps)]

    @property
    def skipped(self) -> int:
        return self.calls - self.full

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def config(self) -> Any:
        if self.mode == "first_block":
            from diffusers.hooks import FirstBlockCacheConfig

            return FirstBlockCacheConfig(threshold=self.threshold)
        from diffusers.hooks import MagCacheConfig

        return MagCacheConfig(threshold=self.threshold, max_skip_steps=MAG_MAX_SKIP_STEPS,
                              retention_ratio=MAG_RETENTION, num_inference_steps=self.steps,
                              mag_ratios=list(self.mag_ratios))  # fmt: skip

    def __enter__(self) -> StepCache:
        t = self.transformer
        blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
        self._wrap(blocks[-1], self._last_block)
        if self.calibrate:
            self._wrap(blocks[0], self._first_block)
        if self.enabled:
            t.enable_cache(self.config())
        self._handles = [t.register_forward_pre_hook(self._before_call), t.register_forward_hook(self._after_call)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._exit_context()
        if self.enabled:
            self.transformer.disable_cache()
        for block, original in reversed(self._wrapped):
            if original is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = original
        self._wrapped = []

    def _wrap(self, block: Any, around: Any) -> None:
        original = block.__dict__.get("forward")  # a compiled forward, or none (the class's)
        inner = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return around(inner, *args, **kwargs)

        self._wrapped.append((block, original))
        block.forward = forward

    def _last_block(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        self.full += 1
        out = inner(*args, **kwargs)
        if self.calibrate and self._first_input is not None:
            self._record(out[0] - self._first_input)
        return out

    def _first_block(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        conditional = (self.calls - 1) % self.calls_per_step == 0
        self._first_input = (args[0] if args else kwargs["hidden_states"]) if conditional else None
        return inner(*args, **kwargs)

    def _record(self, residual: Any) -> None:
        step = ((self.calls - 1) // self.calls_per_step) % self.steps
        if step == 0:
            self._previous = None
        if self._previous is not None:
            ratio = (residual.float().norm(dim=-1) / (self._previous.float().norm(dim=-1) + 1e-8)).mean()
            self._measured[step].append(float(ratio))
        self._previous = residual
        self._first_input = None

    def ratios(self) -> list[float]:
        """Calibrated ratios, one per step (step 1's is 1.0), averaged over the sections."""
        return [1.0] + [round(sum(r) / len(r), 5) if r else 1.0 for r in self._measured[1:]]

    def _before_call(self, *_: Any) -> None:
        if self.enabled:
            if self.calls % (self.calls_per_step * self.steps) == 0:  # a new section: new noise, nothing to reuse
                self.transformer._reset_stateful_cache()
            name = "cond" if self.calls % self.calls_per_step == 0 else "uncond"
            self._context = self.transformer.cache_context(name)
            self._context.__enter__()
        self.calls += 1

    def _after_call(self, *_: Any) -> None:
        self._exit_context()

    def _exit_context(self) -> None:
        if self._context is not None:
            ctx, self._context = self._context, None
            ctx.__exit__(None, None, None)
