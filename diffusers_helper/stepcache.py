"""FramePack's TeaCache, done with diffusers' First Block Cache.

TeaCache skips the expensive blocks of a step when the model's input barely changed since
the last computed step.  diffusers ships the same idea as ``FirstBlockCacheConfig``: the
first block always runs, and when its output residual moved less than ``threshold``
(relative L1) the remaining blocks reuse the cached residual.

diffusers' FramePack pipeline does not open the ``cache_context`` the cache hooks need,
so :class:`StepCache` opens one around every transformer call, with a separate state for
the conditional and the unconditional call when real CFG runs (comparing one with the
other would make the cache skip on nonsense).  It also counts calls and skips, for the
sidecar.
"""

from __future__ import annotations

from typing import Any


class StepCache:
    """Context manager: enable the step cache (if asked) and count calls and skips.

    A skipped call never runs the last block's own forward (the cache hook returns the
    cached residual instead), so a hook on a sub-module of that block counts the calls
    that really computed every block.
    """

    def __init__(self, transformer: Any, enabled: bool, threshold: float, calls_per_step: int = 1):
        self.transformer = transformer
        self.enabled = enabled
        self.threshold = threshold
        self.calls_per_step = calls_per_step
        self.calls = 0
        self.full = 0
        self._context: Any = None
        self._handles: list[Any] = []

    @property
    def skipped(self) -> int:
        return self.calls - self.full

    def __enter__(self) -> StepCache:
        t = self.transformer
        if self.enabled:
            from diffusers.hooks import FirstBlockCacheConfig

            t.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
        last_block = (list(t.single_transformer_blocks) or list(t.transformer_blocks))[-1]
        self._handles = [
            t.register_forward_pre_hook(self._before_call),
            t.register_forward_hook(self._after_call),
            next(last_block.children()).register_forward_hook(self._on_full),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._exit_context()
        if self.enabled:
            self.transformer.disable_cache()

    def _before_call(self, *_: Any) -> None:
        if self.enabled:
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

    def _on_full(self, *_: Any) -> None:
        self.full += 1
