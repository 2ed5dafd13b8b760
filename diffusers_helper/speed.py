"""How fast the transformer runs: compiled blocks, FP8 linears, the attention backend.

Three worker-wide options (``FRAMEPACK_COMPILE``, ``FRAMEPACK_QUANT``,
``FRAMEPACK_ATTENTION``), each ``auto`` by default, resolved once per worker against the
device it has (:func:`resolve`), checked (:func:`check`: an option the machine cannot honour
is one clear :class:`SpeedOptionError`) and applied to every transformer it loads
(:func:`apply`), in the only order that works: quantize, pick the attention backend,
compile.

- **Compiled blocks** (regional compilation): each of the 60 transformer blocks' ``forward``
  goes through ``torch.compile``; the 20 dual-stream and 40 single-stream blocks share
  their compiled code.  The block's ``forward`` itself is replaced (not ``Module.compile``,
  which compiles ``__call__``): the step caches' hooks wrap a block's ``forward`` and are
  excluded from compilation, so under ``Module.compile`` a cached job would run every
  block eagerly; wrapping the compiled ``forward`` keeps it compiled.
- **FP8**: every ``Linear`` of those blocks through torchao's float8 dynamic quantization
  (e4m3 weights and activations, one scale per row), on CUDA GPUs of compute capability 8.9
  or newer.  The quantized transformer stays on the GPU: low-VRAM streaming of FP8 weights
  is not supported, and neither are LoRAs (peft cannot wrap a float8 base layer); both are
  refused with a message instead.
- **Attention**: diffusers' attention dispatcher (``set_attention_backend``); a backend
  counts as available when a tiny attention call through it works on this device.

``auto`` means: on CUDA, the fastest combination measured to stay close to eager bf16
(docs/benchmarks.md, "Speed options"); on CPU everything off.  Torch-only at import time.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
COMPILE_CHOICES = ("off", "blocks")
QUANT_CHOICES = ("none", "fp8")
#: The dispatcher's backends that can run without a download (hub kernels never load here).
ATTENTION_CANDIDATES = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "flex",
                        "flash", "_flash_3", "sage", "xformers")  # fmt: skip
#: What ``auto`` picks on CUDA, first available wins: on an H200 PyTorch's own choice (native,
#: 1.119 s per step) beat cuDNN (1.146), flash (1.384) and efficient (2.080): docs/benchmarks.md.
CUDA_ATTENTION_PREFERENCE = ("native",)
#: FP8 matrix products need Ada (8.9) or Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)
#: The blocks that are compiled and quantized (the transformer's repeated blocks).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class SpeedOptionError(ValueError):
    """An option this worker cannot honour; the message is one line naming the variable."""


@dataclass(frozen=True)
class SpeedOptions:
    """The worker's speed options; ``auto`` in a field until :func:`resolve` fills it."""

    compile: str = AUTO
    quant: str = AUTO
    attention: str = AUTO

    def public_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def resolved(self) -> bool:
        return AUTO not in (self.compile, self.quant, self.attention)


#: Everything off: what CPU workers, tests and the eager reference run.
EAGER = SpeedOptions("off", "none", "native")


@dataclass(frozen=True)
class Device:
    """What the options depend on: the device type, its compute capability, low-VRAM mode."""

    type: str  # "cuda" | "cpu"
    capability: tuple[int, int] | None = None
    low_vram: bool = False
    dtype: Any = None  # the transformer's dtype

    @classmethod
    def of(cls, placement: Any) -> Device:
        import torch

        cap = torch.cuda.get_device_capability() if placement.device == "cuda" else None
        return cls(placement.device, cap, bool(placement.low_vram), placement.dtype)

    @property
    def has_fp8(self) -> bool:
        return self.type == "cuda" and self.capability is not None and self.capability >= FP8_MIN_CAPABILITY


# -- availability -----------------------------------------------------------------------------
@functools.cache
def attention_works(name: str, device_type: str) -> str | None:
    """``None`` when a small attention call through backend ``name`` runs on this device,
    else why not (one line)."""
    import torch

    try:
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
            dispatch_attention_fn,
        )

        backend = AttentionBackendName(name)
        _check_attention_backend_requirements(backend)
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        q = torch.randn(1, 64, 2, 64, device=device_type, dtype=dtype)  # (batch, tokens, heads, head dim)
        out = dispatch_attention_fn(q, q, q, backend=backend)
        if tuple(out.shape) != tuple(q.shape) or not torch.isfinite(out).all():
            return "gave a wrong result"
        return None
    except Exception as exc:  # noqa: BLE001 — any failure means "not here"
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def available_attention(device_type: str) -> list[str]:
    """The attention backends that work on this device (``native`` always does)."""
    return [n for n in ATTENTION_CANDIDATES if attention_works(n, device_type) is None]


@functools.cache
def compile_works(device_type: str) -> str | None:
    """``None`` when ``torch.compile`` (inductor) compiles and runs a small function here,
    else why not (a machine without a C++ compiler or Triton cannot)."""
    import torch

    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, dynamic=False)
        x = torch.randn(8, 8, device=device_type)
        if not torch.allclose(fn(x), torch.nn.functional.gelu(x) * 2 + 1, atol=1e-5):
            return "compiled code gave a different result"
        return None
    except Exception as exc:  # noqa: BLE001
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def fp8_problem(device: Device) -> str | None:
    if device.type != "cuda":
        return "FP8 needs a CUDA GPU of compute capability 8.9 or newer; this worker runs on the CPU"
    if not device.has_fp8:
        cap = ".".join(map(str, device.capability or ()))
        return f"FP8 needs compute capability 8.9 or newer; this GPU has {cap}"
    if device.low_vram:
        return ("FP8 keeps the transformer on the GPU, but this worker runs in low-VRAM mode (its blocks may "
                "stream from CPU memory); use FRAMEPACK_QUANT=none here")  # fmt: skip
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "FP8 needs the torchao package (pip install torchao)"
    return None


# -- resolving and checking -------------------------------------------------------------------
def resolve(requested: SpeedOptions, device: Device) -> SpeedOptions:
    """Fill every ``auto``: on CUDA the fastest measured combination this device supports;
    on CPU everything off (inductor's CPU code gains little on a tiny model, and FP8 and the
    fused attention kernels are GPU-only)."""
    opts = requested
    cuda = device.type == "cuda"
    if opts.compile == AUTO:
        opts = replace(opts, compile="blocks" if cuda and compile_works(device.type) is None else "off")
    if opts.quant == AUTO:  # FP8 is opt-in: compiling its blocks took 237 s on an H200 (bf16: 19 s)
        opts = replace(opts, quant="none")
    if opts.attention == AUTO:
        pick = "native"
        if cuda:
            pick = next((n for n in CUDA_ATTENTION_PREFERENCE if attention_works(n, device.type) is None), "native")
        opts = replace(opts, attention=pick)
    return opts


def check(options: SpeedOptions, device: Device) -> None:
    """Raise :class:`SpeedOptionError` (one line, naming the variable) when ``options``
    (resolved) cannot run on ``device``."""
    if options.compile not in COMPILE_CHOICES:
        raise SpeedOptionError(f"FRAMEPACK_COMPILE={options.compile!r}: use auto, {', '.join(COMPILE_CHOICES)}")
    if options.quant not in QUANT_CHOICES:
        raise SpeedOptionError(f"FRAMEPACK_QUANT={options.quant!r}: use auto, {', '.join(QUANT_CHOICES)}")
    if options.compile == "blocks":
        why = compile_works(device.type)
        if why:
            raise SpeedOptionError(f"FRAMEPACK_COMPILE=blocks: torch.compile cannot compile on this machine ({why})")
    if options.quant == "fp8":
        why = fp8_problem(device)
        if why:
            raise SpeedOptionError(f"FRAMEPACK_QUANT=fp8: {why}")
    if options.attention not in ATTENTION_CANDIDATES:
        raise SpeedOptionError(f"FRAMEPACK_ATTENTION={options.attention!r} is unknown; available here: "
                               f"{', '.join(available_attention(device.type))}")  # fmt: skip
    why = attention_works(options.attention, device.type)
    if why:
        raise SpeedOptionError(f"FRAMEPACK_ATTENTION={options.attention!r} does not run here ({why}); available "
                               f"here: {', '.join(available_attention(device.type))}")  # fmt: skip


# -- applying ---------------------------------------------------------------------------------
def blocks(transformer: Any) -> list[Any]:
    return [b for name in BLOCK_LISTS for b in getattr(transformer, name, ())]


def quantize_fp8(transformer: Any) -> int:
    """Every ``Linear`` of the repeated blocks to float8 (torchao, per-row scales); returns
    how many.  The embedders, norms and the output projection stay in bf16."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = 0

    def in_blocks(module: Any, fqn: str) -> bool:
        nonlocal count
        hit = isinstance(module, torch.nn.Linear) and fqn.startswith(tuple(f"{n}." for n in BLOCK_LISTS))
        count += hit
        return hit

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=in_blocks)
    return count


def compile_blocks(transformer: Any, backend: Any = "inductor") -> int:
    """Regional compilation: each block's ``forward`` through ``torch.compile`` (see the
    module docstring for why ``forward`` and not the module); returns how many."""
    import torch

    # 60 blocks of two classes share code; recompiles for new shapes (text length, bucket)
    # go dynamic after the first, so the default limit of 8 per code object is ample, but
    # LoRA sets change the modules inside the blocks and each is one more entry.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    found = blocks(transformer)
    for block in found:
        if not getattr(block, "_framepack_compiled", False):
            block.forward = torch.compile(block.forward, backend=backend)
            block._framepack_compiled = True
    return len(found)


def apply(transformer: Any, options: SpeedOptions, backend: Any = "inductor") -> dict[str, Any]:
    """Quantize, set the attention backend, compile: once per transformer (the same options
    again are a no-op; none of it can be undone).  Returns what was done, with the seconds
    each step took."""
    current = getattr(transformer, "_framepack_speed", None)
    if current == options:
        return {}
    if current not in (None, EAGER):
        raise RuntimeError(f"speed options {current.public_dict()} are applied already; cannot apply {options}")
    assert options.resolved, options
    done: dict[str, Any] = {}
    t = time.perf_counter()
    if options.quant == "fp8":
        done["fp8_linears"] = quantize_fp8(transformer)
        done["quantize_s"] = round(time.perf_counter() - t, 3)
    if options.attention != "native":
        _quiet_attention_warning()
        transformer.set_attention_backend(options.attention)
    if options.compile == "blocks":
        done["compiled_blocks"] = compile_blocks(transformer, backend)
    transformer._framepack_speed = options
    if done:
        log.info("transformer speed options %s: %s", options.public_dict(), done)
    return done


def _quiet_attention_warning() -> None:
    """``set_attention_backend`` warns "experimental" on every call; once in our log is enough."""
    import diffusers

    diffusers.utils.logging.get_logger("diffusers.models.modeling_utils").setLevel(logging.ERROR)


def options_of(transformer: Any) -> SpeedOptions:
    """The options applied to ``transformer`` (eager when none were)."""
    return getattr(transformer, "_framepack_speed", None) or EAGER


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusers_helper.speed compile=X quant=Y attention=Z``: resolve and check the
    options on this machine's first device in a fresh process (a Celery worker calls this
    before it forks: CUDA must not be initialised in the parent).  Prints the resolved
    options as JSON, or the one-line error and exits 2."""
    import json
    import sys

    import torch

    from .profiles import Placement

    fields = dict(arg.split("=", 1) for arg in (sys.argv[1:] if argv is None else argv))
    requested = SpeedOptions(**{k: v.strip().lower() or AUTO for k, v in fields.items()})
    placement = Placement.detect()
    device = Device.of(placement)
    try:
        resolved = resolve(requested, device)
        check(resolved, device)
    except SpeedOptionError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps({**resolved.public_dict(), "device": device.type, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
