"""Training-time noise-level densities.

- sigma ~ LogNormal(mean, std): ln sigma ~ N(-0.5, 1.2^2) for the released model (SPEC §5.1).
- sigma_lr (low-res noise augmentation): 0 with probability ``p_zero``, otherwise U(0, max) (SPEC §5.4).
"""

import torch


def lognormal(n: int, mean: float = -0.5, std: float = 1.2, generator=None, device=None) -> torch.Tensor:
    """n noise levels with ln sigma ~ N(mean, std^2)."""
    return (torch.randn(n, generator=generator, device=device) * std + mean).exp()


def low_res_sigma(n: int, p_zero: float = 0.5, maximum: float = 0.6, generator=None, device=None) -> torch.Tensor:
    """n augmentation levels: 0 with probability p_zero, else uniform on (0, maximum)."""
    u = torch.rand(n, generator=generator, device=device)
    level = torch.rand(n, generator=generator, device=device) * maximum
    return torch.where(u < p_zero, torch.zeros_like(level), level)
