"""Uploaded images become the right 8-bit RGB picture, whatever their mode (checked by pixel
values), and what cannot be one is refused naming the field."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from webapp.uploads import ImageError, normalise


def _pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.mode == "RGB" and img.format == "PNG"
    return np.asarray(img, dtype=int)


def _encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes none with colour): H x W x C, C = 1..4."""
    h, w, c = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_keep_their_brightness(channels):
    """Grey (+alpha) at mid-grey, RGB(A) at mid-red, all in 16 bits."""
    values = np.zeros((32, 32, channels), np.uint16)
    values[..., 0] = 128 * 257
    if channels in (2, 4):
        values[..., -1] = 65535  # opaque
    got = _pixels(normalise("image", png16(values)))
    if channels in (1, 2):
        assert (got == 128).all()  # 16-bit greyscale came out white (255) before
    else:
        assert (got[..., 0] == 128).all() and (got[..., 1:] == 0).all()


def test_palette_and_grey_alpha_images_give_their_colours():
    palette = Image.new("P", (32, 32))
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    got = _pixels(normalise("image", _encoded(palette)))
    assert got[0, 0].tolist() == [200, 30, 10] and got[0, 31].tolist() == [0, 0, 0]

    grey_alpha = Image.new("LA", (32, 32), (90, 128))
    assert (_pixels(normalise("image", _encoded(grey_alpha))) == 90).all()  # alpha dropped, grey kept


def test_cmyk_jpegs_become_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    got = _pixels(normalise("image", _encoded(cmyk, "JPEG", quality=95)))
    r, g, b = got[16, 16]
    assert r > 240 and g < 15 and b < 15


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left of a landscape picture
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    got = _pixels(normalise("image", _encoded(img, "JPEG", quality=95, exif=exif)))
    assert got.shape[:2] == (40, 20)  # portrait once rotated
    assert got[2, 10, 0] > 200 and got[37, 10, 2] > 200  # the red end is on top, as a viewer shows it


def test_animations_give_their_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    got = _pixels(normalise("image", gif.getvalue()))
    assert got[16, 16, 0] > 240 and got[16, 16, 1:].max() < 15


@pytest.mark.parametrize("data, says", [(b"", "empty"), (b"not an image", "not an image"),
                                        (png16(np.zeros((8, 8, 1), np.uint16)), "too small")])  # fmt: skip
def test_what_is_not_a_usable_image_is_refused_naming_the_field(data, says):
    with pytest.raises(ImageError) as err:
        normalise("end_image", data)
    assert err.value.field == "end_image" and says in err.value.message
