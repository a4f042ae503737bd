"""Exponential moving average of the weights with a power warm-up (k-diffusion's EMAWarmup, SPEC §5.2).

At the t-th update (t = 0, 1, ...):

    decay(t) = clamp(1 - (1 + t / inv_gamma)^(-power), min_decay, max_decay),   θ_ema ← decay θ_ema + (1 - decay) θ

decay(0) = 0 copies the weights; with power 2/3 the decay is 0.999 after ~31.6k updates and reaches its cap 0.9999
after ~1M. Buffers (e.g. fixed Fourier weights) are copied, not averaged.
"""

import torch
from torch import nn


def ema_decay(step: int, power: float = 2 / 3, inv_gamma: float = 1.0, min_decay: float = 0.0,
              max_decay: float = 0.9999) -> float:
    """decay(t) for the t-th update."""
    value = 1 - (1 + step / inv_gamma) ** -power
    return min(max_decay, max(min_decay, value))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← θ_ema + (1 - decay)(θ - θ_ema) for parameters (same order, shapes and dtypes), buffers copied: one
    fused multi-tensor lerp and one multi-tensor copy, whatever the number of tensors."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"EMA model has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    ema_buffers = list(ema.buffers())
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, list(model.buffers()))
