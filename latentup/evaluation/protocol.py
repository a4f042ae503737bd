"""The evaluation protocol (spec/ANCHORS.md): image lists, HR crops, LR inputs (``latentup.data``) and the rows
compared.

    HR  = centre crop of the image to (W // a * a, H // a * a), a = ``align`` (64: the LR is then a multiple of
          32 px, the released model's size rule), uint8
    LR  = PIL bicubic resize of HR to half size (antialiased, a = -0.5), uint8
    z   = encode(LR)                                       (posterior mean for a KL VAE)
    rows: model_k     upscale_k(z), the model's decoded image (pipeline: decode, then its colour fix)
          model_k picture  upscale_k(LR): the picture path a user runs (infer.py on the LR picture: encode,
                           sample, decode, the fixes against the picture itself)
          ceiling     decode(encode(HR))
          latent-nearest / latent-bicubic       decode(up2(z))
          pixel-bicubic-of-decoded-LR           clamp(bicubic2(decode(z)))
          pixel-bicubic-of-LR                   clamp(bicubic2(LR))              (no autoencoder)

``bicubic2`` is torch's bicubic x2 (Keys a = -0.75, no antialias, latents not clamped). Outputs are float32,
not quantised.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from latentup.autoencoders import Autoencoder
from latentup.data.crops import crop_box, load_pair, open_rgb  # noqa: F401 - the protocol's HR / LR pairs
from latentup.data.sources import list_set_images  # noqa: F401 - the protocol's image lists
from latentup.errors import ConfigError

BASELINES = ("ceiling", "latent-nearest", "latent-bicubic", "pixel-bicubic-of-decoded-LR", "pixel-bicubic-of-LR")


def check_align(align: int, downscale: int = 8) -> None:
    """HR sides must halve into whole latents: ``align`` a multiple of 2 x the autoencoder's downscale."""
    if align < 2 * downscale or align % (2 * downscale):
        raise ConfigError(f"align={align} must be a positive multiple of {2 * downscale}: HR / 2 must be whole latents")


def hr_size(path: str | Path, align: int) -> tuple[int, int]:
    """(width, height) of the HR crop. Decodes the whole image, so a truncated file fails here."""
    left, top, right, bottom = crop_box(*open_rgb(path).size, align)
    return right - left, bottom - top


def nearest2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def bicubic2x(x: Tensor) -> Tensor:
    """Keys bicubic (a = -0.75), half-pixel centres, no antialias; not clamped."""
    return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False, antialias=False)


@dataclass(frozen=True)
class PictureRow:
    """A model row fed the LR picture instead of its latent: ``upscale(lr_pixels) -> image``, e.g.
    ``Upscaler.upscale_pixels`` (infer.py's path for a picture)."""

    upscale: Callable[..., Tensor]

    def __call__(self, pixels: Tensor, **kwargs) -> Tensor:
        return self.upscale(pixels, **kwargs)


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, hr: Tensor, lr: Tensor,
                models: Mapping[str, Callable[..., Tensor]] | None = None, **call) -> dict[str, Tensor]:
    """Every row's ×2 output for a batch: ``{row: [B, 3, H, W] float32 in [0, 1]}``, model rows first.

    ``models`` maps a row name to ``upscale(lr_latent, **call) -> image`` (an SD-scaled latent in, [B, 3, H, W] in
    [0, 1] out), e.g. ``Upscaler.upscale_latent_to_image``, or to a :class:`PictureRow` (the LR picture in).
    """
    param = next(autoencoder.parameters())
    hr, lr = hr.to(param.device, param.dtype), lr.to(param.device, param.dtype)
    z = autoencoder.encode(lr, sample=False)
    rows = {name: up(lr if isinstance(up, PictureRow) else z, **call).to(z.device, z.dtype)
            for name, up in (models or {}).items()}
    rows["ceiling"] = autoencoder.decode(autoencoder.encode(hr, sample=False))
    rows["latent-nearest"] = autoencoder.decode(nearest2x(z))
    rows["latent-bicubic"] = autoencoder.decode(bicubic2x(z))
    rows["pixel-bicubic-of-decoded-LR"] = bicubic2x(autoencoder.decode(z)).clamp(0, 1)
    rows["pixel-bicubic-of-LR"] = bicubic2x(lr).clamp(0, 1)
    return {name: image.float() for name, image in rows.items()}
