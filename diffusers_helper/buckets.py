"""Resolution buckets (torch-free).

FramePack resizes every input to the bucket whose aspect ratio is nearest, from a table
made for base 640.  Other bases scale the table and round each side to a multiple of 16,
which diffusers needs (VAE factor 8 times patch size 2).
"""

from __future__ import annotations

from PIL import Image

#: FramePack's buckets at base 640, as (height, width).
BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960),
    (448, 864),
    (480, 832),
    (512, 768),
    (544, 704),
    (576, 672),
    (608, 640),
    (640, 608),
    (672, 576),
    (704, 544),
    (768, 512),
    (832, 480),
    (864, 448),
    (960, 416),
)
MULTIPLE = 16


def _round16(x: float) -> int:
    return max(MULTIPLE, int(round(x / MULTIPLE)) * MULTIPLE)


def buckets(base: int) -> list[tuple[int, int]]:
    """The bucket table for ``base`` (640 gives FramePack's table unchanged)."""
    if base == 640:
        return list(BUCKETS_640)
    scale = base / 640
    return [(_round16(h * scale), _round16(w * scale)) for h, w in BUCKETS_640]


def nearest_bucket(height: int, width: int, base: int = 640) -> tuple[int, int]:
    """The (height, width) bucket minimising ``|h*bw - w*bh|``; ties go to the later one."""
    best = None
    best_err = None
    for bh, bw in buckets(base):
        err = abs(height * bw - width * bh)
        if best_err is None or err <= best_err:
            best, best_err = (bh, bw), err
    assert best is not None
    return best


def resize_and_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` to cover ``width``x``height`` and crop the centre (RGB out)."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def fit_to_bucket(image: Image.Image, base: int) -> Image.Image:
    """Resize + centre-crop ``image`` to its nearest bucket at ``base``."""
    h, w = nearest_bucket(image.height, image.width, base)
    return resize_and_center_crop(image, h, w)
