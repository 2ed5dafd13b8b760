"""LoRAs on the FramePack transformer, per job, through diffusers' LoRA support (PEFT).

A worker keeps the adapters it has loaded (up to ``capacity``, least recently used out),
each named after its file's hash, so a LoRA used by many jobs loads once.  For one job
:meth:`LoraCache.applied` enables exactly that job's adapters at its weights and disables
them all afterwards, whatever happened: the next job never inherits one.

Formats (:mod:`diffusers_helper.lora_files`): diffusers' own and the original HunyuanVideo
layout go through diffusers' loader, which converts the latter.  kohya/musubi files
(``lora_unet_…``) are converted here when their module names are the transformer's own
(dots written as underscores); files naming the original implementation's modules
(``double_blocks_0_img_attn_qkv``…) are refused with a message that says so.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import lora_files
from .params import LoraSpec

log = logging.getLogger(__name__)


class LoraError(ValueError):
    """A LoRA that cannot be applied; the message names the file and the reason."""


def kohya_to_diffusers(state: dict[str, Any], module_names: list[str], file: str) -> dict[str, Any]:
    """``lora_unet_<module>.lora_down/lora_up/alpha`` -> PEFT's ``transformer.<module>.lora_A/B``.

    kohya scales an adapter by ``alpha / rank``; PEFT's loader here takes none, so the scale
    is folded into ``lora_B``."""
    by_flat = {name.replace(".", "_"): name for name in module_names}
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        if not key.startswith("lora_unet_"):
            raise LoraError(f"{file}: mixed formats (kohya key next to {key!r})")
        flat, _, part = key[len("lora_unet_") :].partition(".")
        groups.setdefault(flat, {})[part] = tensor
    unknown = sorted(flat for flat in groups if flat not in by_flat)
    if unknown:
        raise LoraError(
            f"{file}: kohya/musubi format (lora_unet_… keys) for modules this transformer does not have "
            f"({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}); files written for the original "
            "HunyuanVideo implementation need converting to diffusers' format first"
        )
    out: dict[str, Any] = {}
    for flat, parts in groups.items():
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise LoraError(f"{file}: module {flat} lacks lora_down or lora_up")
        alpha = parts.get("alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        name = by_flat[flat]
        out[f"transformer.{name}.lora_A.weight"] = down
        out[f"transformer.{name}.lora_B.weight"] = up * scale
    return out


def _load_state(path: Path, transformer: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        keys = lora_files.read_keys(path)
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 — a corrupt or foreign file: say which and why
        raise LoraError(f"{path.name}: not a readable safetensors file ({exc})") from None
    fmt = lora_files.detect_format(keys)
    if fmt == "kohya":
        state = kohya_to_diffusers(state, [n for n, _ in transformer.named_modules() if n], path.name)
    elif fmt == "unknown":
        raise LoraError(f"{path.name}: no LoRA keys this service knows (format: unknown, e.g. {keys[:2]})")
    return state


class LoraCache:
    """The adapters loaded into each transformer of a worker, least recently used first."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._loaded: dict[int, OrderedDict[str, None]] = {}

    def _ensure(self, transformer: Any, adapter: str, path: Path) -> None:
        from diffusers import HunyuanVideoFramepackPipeline

        loaded = self._loaded.setdefault(id(transformer), OrderedDict())
        if adapter in loaded:
            loaded.move_to_end(adapter)
            return
        state = _load_state(path, transformer)
        try:
            state = HunyuanVideoFramepackPipeline.lora_state_dict(state)
            with warnings.catch_warnings():  # "multiple adapters in the model": that is the cache's point
                warnings.simplefilter("ignore", UserWarning)
                HunyuanVideoFramepackPipeline.load_lora_into_transformer(state, transformer=transformer,
                                                                         adapter_name=adapter)  # fmt: skip
        except (ValueError, KeyError, RuntimeError) as exc:
            raise LoraError(f"{path.name}: diffusers could not load it ({exc})") from None
        loaded[adapter] = None
        while len(loaded) > self.capacity:
            old, _ = loaded.popitem(last=False)
            transformer.delete_adapters([old])
            log.info("LoRA adapter %s unloaded (cache full)", old)

    @contextmanager
    def applied(self, transformer: Any, specs: list[LoraSpec], directory: Path | None) -> Iterator[list[dict]]:
        """Exactly ``specs`` active on ``transformer`` inside the block; yields what the
        sidecar records of each (name, weight, file hash, format)."""
        infos: list[dict[str, Any]] = []
        names: list[str] = []
        weights: list[float] = []
        try:
            for spec in specs:
                try:
                    path = lora_files.resolve(directory, spec.name)
                except lora_files.LoraFileError as exc:
                    raise LoraError(str(exc)) from None
                digest = lora_files.file_sha256(path)
                adapter = f"lora_{digest[:16]}"  # adapter names must not contain dots
                self._ensure(transformer, adapter, path)
                names.append(adapter)
                weights.append(spec.weight)
                infos.append({"name": path.stem, "weight": spec.weight, "sha256": digest,
                              "format": lora_files.detect_format(lora_files.read_keys(path))})  # fmt: skip
            if names:
                transformer.enable_lora()
                transformer.set_adapters(names, weights)
            yield infos
        finally:
            if self._loaded.get(id(transformer)):
                transformer.disable_lora()  # the next job never inherits an adapter
