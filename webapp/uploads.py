"""Checking uploaded images before anything is queued (Pillow).

Accepts PNG, JPEG, WebP, BMP and GIF (first frame); refuses non-images, truncated files,
images outside the size limits and decompression bombs, each with the field named.
Returns the normalised input: RGB PNG bytes, EXIF orientation applied, long side at most
``MAX_SIDE_OUT`` (the worker fits it to a bucket; no bucket is larger).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "MPO"}
MIN_SIDE = 16
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
MAX_SIDE_OUT = 2048


class ImageError(ValueError):
    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


def decode_base64(field: str, value: str) -> bytes:
    """A data URL or bare base64 -> bytes."""
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(field, "not valid base64 (send a data URL or base64 of the image file)") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a viewer shows, whatever the mode.

    Pillow's ``convert("RGB")`` clips high-bit-depth greyscale (16-bit PNGs open as ``I;16``,
    32-bit ones as ``I``) at 255, so a mid-grey 16-bit image became white; those are scaled to
    8 bits first (``F``: 0..1).  Alpha is dropped, keeping the colour under it, as FramePack's
    own UI (Pillow's RGB conversion) does; palette, grey+alpha and CMYK convert as Pillow
    converts them; an animation's first frame is the one already loaded."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img, dtype=np.float32)
        top = float(values.max(initial=0))
        if img.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 255.0 / (65535 if img.mode.startswith("I;16") or top <= 65535 else 2**32 - 1)
        img = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def normalise(field: str, data: bytes) -> bytes:
    if not data:
        raise ImageError(field, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in FORMATS:
                raise ImageError(field, f"unsupported image format {img.format}; use PNG, JPEG or WebP")
            w, h = img.size
            if min(w, h) < MIN_SIDE:
                raise ImageError(field, f"image too small ({w}x{h}); each side must be at least {MIN_SIDE} px")
            if max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
                raise ImageError(
                    field, f"image too large ({w}x{h}); at most {MAX_SIDE} px a side and {MAX_PIXELS} pixels"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(field, "image refused: decompression bomb") from None
    except UnidentifiedImageError:
        raise ImageError(field, "not an image (PNG, JPEG or WebP expected)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(field, f"unreadable or truncated image ({exc})") from None
    img = to_rgb(ImageOps.exif_transpose(img))
    img.thumbnail((MAX_SIDE_OUT, MAX_SIDE_OUT), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
