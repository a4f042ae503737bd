"""Pixel-side pair making: HR crops aligned to the model's size rule, LR = HR downscaled ×2.

Size rule (SPEC §2.6): the HR latent sides must be multiples of 2^(levels-1) and at least 2^levels, i.e. with the
×8 autoencoder, HR pixel sides multiples of ``align = 8 · 2^(levels-1)`` (64 px for the released 4-level U-Net).
LR = PIL bicubic (antialiased, a = -0.5) ×1/2 of the uint8 HR crop, the evaluation protocol's LR (ANCHORS.md);
:func:`load_pair` is that protocol's pair of a whole image (centre crop to multiples of ``align``).
"""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latentup.errors import ConfigError, InputError
from latentup.imageio import to_tensor

Box = tuple[int, int, int, int]  # left, top, right, bottom
# the 8 symmetries of the square (identity first), for augmenting crops before the LR is made from them
DIHEDRAL = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
            Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
            Image.Transpose.TRANSVERSE)


def check_crop(crop: int, align: int = 64) -> int:
    """``crop`` itself, or a ConfigError when it breaks the size rule."""
    if crop <= 0 or crop % align or crop < 2 * align:
        raise ConfigError(f"crop {crop} px breaks the U-Net size rule: use a multiple of {align} px, "
                          f"at least {2 * align}")
    return crop


def random_boxes(width: int, height: int, crop: int, count: int, rng: np.random.Generator) -> list[Box]:
    """``count`` uniformly placed crop × crop boxes (none when the image is smaller than the crop)."""
    if width < crop or height < crop:
        return []
    left = rng.integers(0, width - crop + 1, size=count)
    top = rng.integers(0, height - crop + 1, size=count)
    return [(int(x), int(y), int(x) + crop, int(y) + crop) for x, y in zip(left, top)]


def grid_boxes(width: int, height: int, crop: int, stride: int | None = None) -> list[Box]:
    """Row-major crop × crop tiles every ``stride`` px (default: non-overlapping), centred in the image."""
    stride = stride or crop
    if width < crop or height < crop:
        return []
    nx, ny = (width - crop) // stride + 1, (height - crop) // stride + 1
    x0, y0 = (width - crop - (nx - 1) * stride) // 2, (height - crop - (ny - 1) * stride) // 2
    return [(x0 + i * stride, y0 + j * stride, x0 + i * stride + crop, y0 + j * stride + crop)
            for j in range(ny) for i in range(nx)]


def limit_side(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale (antialiased bicubic) so that the longer side is at most ``max_side``; None keeps the image."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
    return image.resize(size, Image.BICUBIC)


def downscale_x2(image: Image.Image) -> Image.Image:
    """LR image: PIL bicubic resize to half size (antialiased)."""
    return image.resize((image.width // 2, image.height // 2), Image.BICUBIC)


def pair(image: Image.Image, box: Box, transpose: Image.Transpose | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR [3, S, S], LR [3, S/2, S/2]) float tensors in [0, 1] for one box of an RGB image; ``transpose`` (one of
    ``DIHEDRAL``) turns or mirrors the HR crop first, so the LR is exactly the protocol's LR of what the model sees."""
    hr = image.crop(box)
    if transpose is not None:
        hr = hr.transpose(transpose)
    return to_tensor(hr)[0], to_tensor(downscale_x2(hr))[0]


def crop_box(width: int, height: int, align: int) -> Box:
    """(left, top, right, bottom) of the centred crop to multiples of ``align``; offsets floored."""
    cw, ch = width // align * align, height // align * align
    if cw == 0 or ch == 0:
        raise InputError(f"a {width}x{height} image is smaller than align={align} px: lower align or drop the image")
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def open_rgb(path: str | Path) -> Image.Image:
    """``Image.open(path).convert("RGB")`` (greyscale becomes three equal channels), one-line errors."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise InputError(f"{path} is not a readable image ({type(error).__name__}): fix or remove it") from None


def load_pair(path: str | Path, align: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR [3, H, W], LR [3, H/2, W/2]) in [0, 1] of an image file, both from uint8 images."""
    image = open_rgb(path)
    return pair(image, crop_box(*image.size, align))
