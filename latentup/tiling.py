"""Run a network on overlapping tiles and blend them, so that big inputs fit in bounded memory.

Along each axis, n tiles of side t start at evenly spaced offsets (multiples of ``align``), neighbours overlapping
by o' ≥ ``overlap`` - align. Over an overlap a tile's weight rises as w(u) = sin²(πu/2), u = (i + ½)/o', while its
neighbour's falls as cos²(πu/2): the weights sum to 1 everywhere and the blend is C¹, so no step appears at a
border. The result is Σ_t w_t·f(tile_t) / Σ_t w_t, accumulated in float32.
"""

import math
from collections.abc import Callable

import torch

from latentup.errors import InputError


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Offsets of tiles of side ``min(tile, size)`` that cover [0, size), overlapping by about ``overlap``."""
    if size % align or tile % align or not 0 <= overlap <= tile // 2:
        raise InputError(f"cannot tile {size} px into tiles of {tile} (overlap {overlap}, multiples of {align}): "
                         f"use a tile size that is a multiple of {align} and an overlap of at most half a tile")
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1) / align) * align for i in range(n)]


def ramp(length: int, rise: int, fall: int, device=None) -> torch.Tensor:
    """1-D weights: sin² rising over the first ``rise`` samples, falling over the last ``fall``, 1 between."""
    i = torch.arange(length, dtype=torch.float32, device=device) + 0.5
    w = torch.ones(length, device=device)
    if rise:
        w = torch.minimum(w, torch.sin(math.pi / 2 * (i / rise).clamp(max=1)) ** 2)
    if fall:
        w = torch.minimum(w, torch.sin(math.pi / 2 * ((length - i) / fall).clamp(max=1)) ** 2)
    return w


def _axis(size: int, tile: int, overlap: int, align: int, scale: float) -> list[tuple[slice, slice, int, int]]:
    """(input slice, output slice, output rise, output fall) per tile along one axis."""
    starts, side = tile_starts(size, tile, overlap, align), min(tile, size)
    out = []
    for k, start in enumerate(starts):
        rise = starts[k - 1] + side - start if k else 0
        fall = start + side - starts[k + 1] if k + 1 < len(starts) else 0
        out.append((slice(start, start + side), slice(round(start * scale), round((start + side) * scale)),
                    round(rise * scale), round(fall * scale)))
    return out


def blend_tiles(fn: Callable[[slice, slice], torch.Tensor], height: int, width: int, tile: int, overlap: int,
                scale: float = 1.0, align: int = 1) -> torch.Tensor:
    """Σ w·fn(ys, xs) / Σ w over the tiles of a [height, width] input; ``fn`` maps input slices to a tile output
    [B, C, h·scale, w·scale] (decoders scale up, encoders down). Returns [B, C, height·scale, width·scale]."""
    out = weight = dtype = None
    for ys, oy, *y_ramp in _axis(height, tile, overlap, align, scale):
        for xs, ox, *x_ramp in _axis(width, tile, overlap, align, scale):
            part = fn(ys, xs)
            if out is None:
                size = (round(height * scale), round(width * scale))
                out = torch.zeros(*part.shape[:2], *size, device=part.device, dtype=torch.float32)
                weight = torch.zeros(size, device=part.device, dtype=torch.float32)
                dtype = part.dtype
            w = ramp(part.shape[-2], *y_ramp, part.device)[:, None] * ramp(part.shape[-1], *x_ramp, part.device)
            out[..., oy, ox] += part.float() * w
            weight[oy, ox] += w
    return (out / weight).to(dtype)
