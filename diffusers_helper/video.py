"""Writing mp4 files browsers can play while they download.

H.264 in yuv420p with the moov atom first (``+faststart``), written to a temporary name
in the same directory and renamed, so a reader (the web tier serving a growing video)
never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from .params import FPS


def write_mp4(path: str | os.PathLike, frames: np.ndarray, crf: int = 16, fps: int = FPS) -> Path:
    """Write ``frames`` (``(T, H, W, 3)`` uint8) to ``path`` atomically and return the path.

    CRF 0 would make libx264 pick a lossless profile that browsers refuse, so 0 is
    written as 1 (visually identical).
    """
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width = w - (w % 2)
            stream.height = h - (h % 2)
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(max(crf, 1)), "preset": "veryfast"}
            for frame in frames:
                vf = av.VideoFrame.from_ndarray(frame[: stream.height, : stream.width], format="rgb24")
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of an mp4 as ``(T, H, W, 3)`` uint8 (tests and tools)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def video_tensor_to_frames(video) -> np.ndarray:
    """diffusers' decoded video ``(1, 3, T, H, W)`` in [-1, 1] -> ``(T, H, W, 3)`` uint8."""
    v = video[0].detach().float().clamp(-1, 1).add(1).mul(127.5).add(0.5)
    return v.to("cpu").byte().permute(1, 2, 3, 0).contiguous().numpy()
