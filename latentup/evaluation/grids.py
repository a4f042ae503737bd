"""Side-by-side comparison grids: LR (nearest-enlarged) | baselines | model(s) | ceiling | HR, labelled.

Top row: each full image, shrunk so its longer side is at most ``tile`` px, the zoom window outlined.
Bottom row: the zoom window (side = a quarter of the shorter HR side), nearest-enlarged to the column width.
The zoom window is the one with the most HR luma gradient energy, so it lands on detail.
"""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from latentup.atomic import write_atomic

LABEL_HEIGHT = 36
GAP = 4
OUTLINE = (255, 40, 40)


def zoom_window(hr: Tensor) -> tuple[int, int, int]:
    """(top, left, side) of the square window of ``hr`` [3, H, W] with the largest mean |grad Y|."""
    side = max(8, min(hr.shape[-2:]) // 4)
    y = (0.299 * hr[0] + 0.587 * hr[1] + 0.114 * hr[2])[None, None].float()
    energy = (y[..., 1:, :-1] - y[..., :-1, :-1]).abs() + (y[..., :-1, 1:] - y[..., :-1, :-1]).abs()
    stride = max(1, side // 4)
    pooled = F.avg_pool2d(energy, side, stride=stride)[0, 0]
    index = int(pooled.flatten().argmax())
    return index // pooled.shape[1] * stride, index % pooled.shape[1] * stride, side


def to_image(x: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> uint8 PIL (rounded)."""
    array = (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, label: str, font, width: int) -> str:
    """Break a long label once, after the last hyphen that keeps the first line inside ``width``."""
    if draw.textlength(label, font=font) <= width or "-" not in label:
        return label
    cuts = [i + 1 for i, c in enumerate(label) if c == "-" and draw.textlength(label[: i + 1], font=font) <= width]
    cut = cuts[-1] if cuts else label.index("-") + 1
    return label[:cut] + "\n" + label[cut:]


def comparison_grid(lr: Tensor, rows: Mapping[str, Tensor], hr: Tensor, tile: int = 256) -> Image.Image:
    """Grid image for one sample: ``lr`` [3, H/2, W/2], ``rows`` {label: [3, H, W]}, ``hr`` [3, H, W]."""
    columns = {"LR (nearest)": F.interpolate(lr[None].float(), scale_factor=2, mode="nearest")[0], **rows, "HR": hr}
    height, width = hr.shape[-2:]
    scale = min(1.0, tile / max(height, width))
    full_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    top, left, side = zoom_window(hr)
    column_width = full_size[0]
    canvas = Image.new("RGB", (len(columns) * (column_width + GAP) - GAP,
                               LABEL_HEIGHT + full_size[1] + GAP + column_width), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for i, (label, image) in enumerate(columns.items()):
        x = i * (column_width + GAP)
        full = to_image(image)
        small = full.resize(full_size, Image.LANCZOS) if scale < 1 else full
        canvas.paste(small, (x, LABEL_HEIGHT))
        corner = (x + left * scale, LABEL_HEIGHT + top * scale)
        draw.rectangle([*corner, corner[0] + side * scale, corner[1] + side * scale], outline=OUTLINE, width=2)
        zoom = full.crop((left, top, left + side, top + side)).resize((column_width, column_width), Image.NEAREST)
        canvas.paste(zoom, (x, LABEL_HEIGHT + full_size[1] + GAP))
        draw.multiline_text((x + 2, 2), _wrap(draw, label, font, column_width - 4), fill="black", font=font, spacing=2)
    return canvas


@torch.no_grad()
def save_grid(path: str | Path, lr: Tensor, rows: Mapping[str, Tensor], hr: Tensor, tile: int = 256) -> None:
    """Write :func:`comparison_grid` as PNG (parent folders created)."""
    grid = comparison_grid(lr, rows, hr, tile)
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
