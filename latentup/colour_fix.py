"""Colour fix: take an upscale's low band from its input, keep its high band.

    fixed = clamp(image + G_sigma * (up(reference) - image), 0, 1)

``G_sigma`` is a separable Gaussian blur (sigma in output pixels, edge-replicated), ``up`` is bicubic resizing
of the low-res reference to the output size. The output keeps the sample's detail and takes colour and brightness
at scales above ~sigma from the input, which removes the sample's drift there (e.g. the desaturation of multi-step
samples in the bundled model's card).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from latentup.errors import ConfigError


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W], radius ceil(3 sigma), edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=image.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    channels = image.shape[1]
    out = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def check_colour_fix(sigma: float) -> None:
    if sigma < 0:
        raise ConfigError(f"colour_fix must be >= 0 (a blur sigma in output pixels; 0 = off), got {sigma}")


def colour_fix(image: Tensor, reference: Tensor, sigma: float) -> Tensor:
    """``image`` [B, 3, H, W] in [0, 1] with its low band (Gaussian ``sigma`` px) replaced by ``reference``'s.

    ``reference`` is the low-res input [B, 3, h, w] (resized bicubically to H x W); ``sigma`` 0 returns ``image``.
    """
    check_colour_fix(sigma)
    if sigma == 0:
        return image
    if reference.shape[-2:] != image.shape[-2:]:
        reference = F.interpolate(reference.float(), size=image.shape[-2:], mode="bicubic", align_corners=False)
    difference = reference.to(image.dtype).clamp(0, 1) - image
    return (image + gaussian_blur(difference, sigma)).clamp(0, 1)
