"""Take from the input what the input knows, keep the upscale's detail: two fixes of a decoded 2x image.

Colour fix (``colour_fix`` = sigma): the low band from the input,

    fixed = clamp(image + G_sigma * (up(reference) - image), 0, 1)

``G_sigma`` is a separable Gaussian blur (sigma in output pixels, edge-replicated), ``up`` is bicubic resizing
of the low-res reference to the output size. The output keeps the sample's detail and takes colour and brightness
at scales above ~sigma from the input, which removes the sample's drift there (e.g. the desaturation of multi-step
samples in the bundled model's card).

Back-projection (``back_projection`` = K iterations; Irani & Peleg 1991): the output made consistent with the
input picture y under the downscale that makes low-res pictures, D = antialiased bicubic x1/2 (PIL's reduce),

    x_0 = image,   x_{k+1} = clamp(x_k + up(y - D(x_k)), 0, 1)

so that D(x_K) ≈ y: every band the low-res picture holds comes from it (not only the lowest, as with the blur), and
the band above its Nyquist limit, which the picture cannot know, stays the model's. Only a picture input is such a
y (a decoded latent carries the autoencoder's error).
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


def downscale_x2(image: Tensor) -> Tensor:
    """D: antialiased bicubic x1/2 (a = -0.5, PIL's ``Image.resize(..., BICUBIC)`` reduce)."""
    return F.interpolate(image, scale_factor=0.5, mode="bicubic", align_corners=False, antialias=True)


def back_project(image: Tensor, picture: Tensor, iterations: int) -> Tensor:
    """``image`` [B, 3, H, W] in [0, 1] made consistent with the low-res ``picture`` [B, 3, H/2, W/2] by
    ``iterations`` back-projection steps (module docstring), in float32; 0 returns ``image``."""
    if iterations == 0:
        return image
    picture, out = picture.float(), image.float()
    if picture.shape[-2:] != (out.shape[-2] // 2, out.shape[-1] // 2):
        raise ValueError(f"back_project needs a picture of half the image's size, got {tuple(picture.shape)} for "
                         f"{tuple(image.shape)}")
    for _ in range(iterations):
        residual = picture - downscale_x2(out)
        out = (out + F.interpolate(residual, scale_factor=2, mode="bicubic", align_corners=False)).clamp(0, 1)
    return out.to(image.dtype)
