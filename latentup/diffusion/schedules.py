"""Noise-level (sigma) grids for sampling.

The released model was trained on continuous lognormal sigmas; at inference diffusers walks a log-linear grid
between the extremes of Stable Diffusion's discrete training table (SPEC §3.5):

    beta_i = linspace(sqrt(0.00085), sqrt(0.012), 1000)_i^2,   abar_i = prod_{j<=i} (1 - beta_j),
    sigma_i = sqrt((1 - abar_i) / abar_i),   sigma_min = 0.0291675,  sigma_max = 14.6146.
"""

import math

import torch


def sd_sigma_table() -> torch.Tensor:
    """Stable Diffusion's 1000 training sigmas (ascending, float32), exactly as diffusers computes them."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


SIGMA_MIN, SIGMA_MAX = (float(s) for s in sd_sigma_table()[[0, -1]])


def sigmas_log_linear(steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """``steps + 1`` sigmas, exp(linspace(ln sigma_max, ln sigma_min)), float32; ends at sigma_min, not 0.

    With the defaults this is bit-for-bit diffusers' EulerDiscreteScheduler grid for the released model: its loop
    runs ``steps`` steps and stops at sigma_min, leaving noise of about 0.029 in the latent.
    """
    table = sd_sigma_table()
    hi = table[-1] if sigma_max == SIGMA_MAX else torch.tensor(sigma_max)
    lo = table[0] if sigma_min == SIGMA_MIN else torch.tensor(sigma_min)
    return torch.linspace(float(torch.log(hi)), float(torch.log(lo)), steps + 1).exp()


def sigmas_karras(steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) grid, sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def sigmas_exponential_to_zero(steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """The log-linear grid on ``steps`` points followed by 0: the last step removes all remaining noise."""
    grid = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    return torch.cat([grid, grid.new_zeros(1)]).float()


SCHEDULES = {"log_linear": sigmas_log_linear, "karras": sigmas_karras, "exponential": sigmas_exponential_to_zero}


def make_sigmas(schedule: str, steps: int, **kwargs) -> torch.Tensor:
    """Look up a schedule by name (``log_linear``, ``karras``, ``exponential``)."""
    from latentup.errors import ConfigError

    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    return SCHEDULES[schedule](steps, **kwargs)
