"""Live previews: x0 latents -> RGB by a linear map -> one JPEG strip.

A full VAE decode per step would cost more than the step itself.  FramePack's
``vae_decode_fake`` instead maps the 16 HunyuanVideo latent channels to RGB with one
3x16 matrix plus a bias (published factors, used here as facts), which costs well under a
millisecond.  All latent frames of the section are laid side by side in one row, so a
viewer can cut the strip into tiles and play them as a short animation.

The preview encoding lives here and nowhere else.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .events import Preview

# One (R, G, B) triple per latent channel, channels 0..15 (FramePack's factors).
_HUNYUAN_FACTORS = (
    (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282), (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639), (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894), (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727), (0.0249, -0.0469, -0.1703),
)  # fmt: skip
_HUNYUAN_BIAS = (0.0259, -0.0192, -0.0761)

#: JPEG quality of previews: small enough to stream at every step, clear enough to judge motion.
JPEG_QUALITY = 80


class LatentToRGB:
    """The linear latent->RGB map for a given number of latent channels.

    16 channels (HunyuanVideo's VAE) use FramePack's factors.  Any other count falls back
    to splitting the channels into three contiguous groups whose means drive R, G and B
    around mid-grey: not faithful colours, but motion and layout stay visible.
    """

    def __init__(self, channels: int = 16):
        if channels == len(_HUNYUAN_FACTORS):
            weight = torch.tensor(_HUNYUAN_FACTORS, dtype=torch.float32).T  # (3, C)
            bias = torch.tensor(_HUNYUAN_BIAS, dtype=torch.float32)
        else:
            weight = torch.zeros(3, channels)
            for rgb, group in enumerate(np.array_split(np.arange(channels), 3)):
                if len(group):
                    weight[rgb, group] = 0.25 / len(group)
            bias = torch.full((3,), 0.5)
        self.channels = channels
        self.weight = weight
        self.bias = bias
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """``(C, T, H, W)`` or ``(1, C, T, H, W)`` latents -> ``(3, T, H, W)`` RGB in [0, 1].

        The map runs where the latents are: on a GPU only the 3-channel result crosses to
        the CPU (in :func:`rgb_strip`, as bytes), not 16 float channels.
        """
        if latents.dim() == 5:
            latents = latents[0]
        c, t, h, w = latents.shape
        device = latents.device
        if device not in self._on_device:
            self._on_device[device] = (self.weight.to(device), self.bias.to(device))
        weight, bias = self._on_device[device]
        flat = latents.detach().to(dtype=torch.float32).reshape(c, -1)
        rgb = torch.addmm(bias[:, None], weight, flat)
        return rgb.clamp_(0, 1).reshape(3, t, h, w)


def rgb_strip(rgb: torch.Tensor) -> np.ndarray:
    """``(3, T, H, W)`` in [0, 1] -> ``(H, T*W, 3)`` uint8: the frames side by side."""
    _, t, h, w = rgb.shape
    pixels = rgb.mul(255).add_(0.5).to(torch.uint8).permute(2, 1, 3, 0).reshape(h, t * w, 3)
    return pixels.cpu().numpy()


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_preview(latents: torch.Tensor, mapper: LatentToRGB) -> Preview:
    """Latents of one section (x0 prediction) -> JPEG strip with its tile geometry."""
    rgb = mapper(latents)
    _, t, h, w = rgb.shape
    return Preview(jpeg=encode_jpeg(rgb_strip(rgb)), frames=t, tile_width=w, tile_height=h)
