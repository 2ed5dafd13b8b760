"""Section checkpoints: what a finished section leaves, on disk, to continue exactly.

One file per job (``<stem>-checkpoint.safetensors`` next to its videos), rewritten after
every section, atomically (a temporary file renamed over it): the time-ordered latents of
the video, the start image's latents and SigLIP embeddings, the generator's state, and as
JSON metadata how the video was decoded (:class:`diffusers_helper.sampler.Decode`) plus
what the next section must agree on (model, sizes, seed, prompts, LoRA file hashes).  No
decoded video is stored: it is rebuilt by replaying the decodes, which makes a resumed
job's video identical to an uninterrupted one.

Two uses: a redelivered job (its worker died) resumes after its last finished section,
and a finished job is extended forward with the F1 model (either model's video).
safetensors, not pickle: a checkpoint file never executes anything when read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

#: Bump when the layout changes: older files are then ignored (the job starts over).
VERSION = 1


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Write atomically; returns the file's size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"framepack": json.dumps({"version": VERSION, **meta})})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint at ``path``, or None when there is none (or of another version)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("framepack", "{}"))
        if meta.get("version") != VERSION:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, meta


def mismatch(meta: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot continue this run (None: it can)."""
    for key, want in expected.items():
        if meta.get(key) != want:
            return f"{key} differs ({meta.get(key)!r} in the checkpoint, {want!r} now)"
    return None
