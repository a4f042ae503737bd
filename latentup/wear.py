"""How worn a picture looks, from two signatures that clean photographs lack (``restore="auto"``):

    blockiness  b = mean |ΔY| across the 8-px JPEG grid / mean |ΔY| elsewhere, both directions
                    (≈ 1 for a clean picture: its edges fall anywhere; > 1 when JPEG left block edges)
    blocks      p = share of aligned 2x2 cells whose pixels are all equal (≈ 0 clean, 1 pixelated)

    strength    s = max(ramp(b; 1.10, 1.25), ramp(p; 0.5, 0.8)) in [0, 1],   ramp(v; a, c) = clamp((v - a) / (c - a))

The thresholds come from the training pictures (BSDS500 LR, ``benchmarks/worn_check.py wear``): clean ones have
b <= 1.07 at the 95th percentile (their own JPEG originals leave a trace) and p <= 0.19; after JPEG at quality
20-60, b >= 1.23 at the 5th percentile; pixel blocks give p = 1. The cleaner's output is then blended in by s:
a clean picture is left as it is, a worn one is cleaned. Grain alone leaves neither signature (it is only found
when JPEG followed it).
"""

import torch
from torch import Tensor

BLOCKINESS = (1.10, 1.25)
BLOCKS = (0.5, 0.8)


def _luma(pictures: Tensor) -> Tensor:
    r, g, b = pictures.float().unbind(1)
    return 0.299 * r + 0.587 * g + 0.114 * b


def blockiness(pictures: Tensor) -> Tensor:
    """b per picture of [B, 3, H, W] (1 where a side is under 16 px)."""
    y = _luma(pictures)

    def ratio(steps: Tensor) -> Tensor:  # steps [B, N]: mean |Δ| at each boundary between pixels i and i + 1
        grid = torch.arange(steps.shape[-1], device=steps.device) % 8 == 7
        if steps.shape[-1] < 15:
            return torch.ones(len(steps), device=steps.device)
        return steps[:, grid].mean(-1) / steps[:, ~grid].mean(-1).clamp_min(1e-8)

    across_columns = (y[..., 1:] - y[..., :-1]).abs().mean(-2)
    across_rows = (y[..., 1:, :] - y[..., :-1, :]).abs().mean(-1)
    return (ratio(across_columns) + ratio(across_rows)) / 2


def block_share(pictures: Tensor) -> Tensor:
    """p per picture of [B, 3, H, W] in [0, 1]: equal means within half a grey level."""
    h, w = pictures.shape[-2] // 2 * 2, pictures.shape[-1] // 2 * 2
    cells = pictures[..., :h, :w].float().unfold(-2, 2, 2).unfold(-2, 2, 2)  # [B, 3, h/2, w/2, 2, 2]
    spread = (cells.amax(dim=(-1, -2)) - cells.amin(dim=(-1, -2))).amax(dim=1)
    return (spread <= 0.5 / 255).float().mean(dim=(-1, -2))


def wear_strength(pictures: Tensor) -> Tensor:
    """s per picture of [B, 3, H, W] in [0, 1] (module docstring)."""
    def ramp(value: Tensor, low_high: tuple[float, float]) -> Tensor:
        low, high = low_high
        return ((value - low) / (high - low)).clamp(0, 1)

    return torch.maximum(ramp(blockiness(pictures), BLOCKINESS), ramp(block_share(pictures), BLOCKS))
