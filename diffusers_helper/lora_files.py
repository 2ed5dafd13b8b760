"""The LoRA directory: listing, naming, formats (torch-free: the web tier uses it).

A job names LoRAs by file name only; :func:`resolve` maps a name onto a ``.safetensors``
file inside the directory and refuses anything else (no path, no ``..``, no link out of
it).  A safetensors file starts with an 8-byte length and a JSON header listing every
tensor, so the format is told from the key names without loading a tensor:

- ``diffusers``: ``transformer.<module>.lora_A/lora_B`` (PEFT) keys;
- ``hunyuan-original``: keys of the original HunyuanVideo implementation
  (``double_blocks``/``single_blocks``, ``img_attn_qkv``...), which diffusers converts;
- ``kohya``: ``lora_unet_<module_with_underscores>.lora_down/lora_up/alpha`` keys (what
  kohya's trainers and musubi-tuner write; converted by :mod:`diffusers_helper.lora` when
  the modules are the transformer's own, refused otherwise).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

from .params import LORA_NAME

SUFFIX = ".safetensors"
#: A header larger than this is not a LoRA we would load (and not worth reading).
MAX_HEADER_BYTES = 64 * 2**20


class LoraFileError(ValueError):
    """A LoRA name that resolves to no usable file; the message says why."""


def read_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LoraFileError(f"{path.name}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_BYTES:
            raise LoraFileError(f"{path.name}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as exc:
            raise LoraFileError(f"{path.name}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name}: not a safetensors file (header is not an object)")
    return [k for k in header if k != "__metadata__"]


def detect_format(keys: list[str]) -> str:
    """``diffusers`` | ``hunyuan-original`` | ``kohya`` | ``unknown`` (see the module doc)."""
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys) and all(
        k.startswith("transformer.") for k in keys if "lora" in k
    ):
        return "diffusers"
    if any(re.search(r"(double_blocks|single_blocks|img_attn_qkv|txt_attn_qkv)", k) for k in keys):
        return "hunyuan-original"
    return "unknown"


def resolve(directory: Path | None, name: str) -> Path:
    """The file ``name`` names in ``directory``; :class:`LoraFileError` if there is none."""
    if directory is None:
        raise LoraFileError("no LoRA directory is configured (FRAMEPACK_LORA_DIR)")
    if not re.match(LORA_NAME, name):
        raise LoraFileError(f"{name!r} is not a LoRA file name")
    base = Path(directory).resolve()
    path = (base / (name if name.endswith(SUFFIX) else name + SUFFIX)).resolve()
    if path.parent != base or not path.is_file():
        raise LoraFileError(f"unknown LoRA {name!r} (GET /api/loras lists them)")
    return path


def check(directory: Path | None, name: str) -> Path:
    """:func:`resolve`, and the file's header read: a file ``/api/loras`` would list as
    unreadable is refused at submit (:class:`LoraFileError`), not on the worker."""
    path = resolve(directory, name)
    try:
        read_keys(path)
    except OSError as exc:
        raise LoraFileError(f"{path.name}: unreadable ({exc.strerror or exc})") from None
    return path


def list_loras(directory: Path | None) -> list[dict[str, Any]]:
    """Every ``.safetensors`` file of the directory with its size and detected format."""
    if directory is None or not Path(directory).is_dir():
        return []
    out = []
    for path in sorted(Path(directory).iterdir()):
        if path.suffix != SUFFIX or not path.is_file() or not re.match(LORA_NAME, path.name):
            continue
        try:
            fmt, tensors = detect_format(keys := read_keys(path)), len(keys)
        except (LoraFileError, OSError) as exc:
            fmt, tensors = f"unreadable: {exc}", 0
        out.append({"name": path.stem, "file": path.name, "size": path.stat().st_size, "format": fmt,
                    "tensors": tensors})  # fmt: skip
    return out


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, _size: int, _mtime: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["SUFFIX", "LoraFileError", "check", "detect_format", "file_sha256", "list_loras", "read_keys", "resolve"]
