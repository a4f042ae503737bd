"""Samplers: plain functions ``sampler(model, x, sigmas, *, noise=None, progress=False) -> x``.

``model(x, sigma) -> x0`` is a denoiser (guidance already applied); ``sigmas`` is a decreasing grid whose first
entry is the noise level of ``x``; ``noise(x)`` returns fresh N(0, I) noise shaped like x (ancestral samplers
only). Arithmetic is float32. With d = (x - D(x; s)) / s the probability-flow ODE is dx/ds = d.
"""

import torch
from tqdm.auto import tqdm

from latentup.errors import ConfigError


def _steps(sigmas: torch.Tensor, progress: bool, name: str):
    return tqdm(range(len(sigmas) - 1), desc=name, disable=not progress, leave=False)


@torch.no_grad()
def euler(model, x, sigmas, *, noise=None, progress=False):
    """Euler: x <- x + d (s_next - s). Bit-for-bit diffusers' EulerDiscreteScheduler step (gamma = 0)."""
    for i in _steps(sigmas, progress, "euler"):
        sigma = sigmas[i]
        derivative = (x - model(x, sigma)) / sigma
        x = x + derivative * (sigmas[i + 1] - sigma)
    return x


@torch.no_grad()
def euler_ancestral(model, x, sigmas, *, noise=None, progress=False, eta: float = 1.0):
    """Euler ancestral: step down to s_down, then add noise of std s_up, with s_down^2 + s_up^2 = s_next^2."""
    if noise is None:
        raise ConfigError("euler_ancestral needs a noise source (noise=...)")
    for i in _steps(sigmas, progress, "euler_ancestral"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(x) * sigma_up
    return x


@torch.no_grad()
def heun(model, x, sigmas, *, noise=None, progress=False):
    """Heun (EDM Alg. 1, no churn): Euler predictor, trapezoidal corrector; the last step to 0 is plain Euler."""
    for i in _steps(sigmas, progress, "heun"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, sigma)) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - model(x_euler, sigma_next)) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def dpmpp_2m(model, x, sigmas, *, noise=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022) in t = -ln(sigma):

    x_next = (s_next / s) x - expm1(-h) D',  h = t_next - t,
    D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with r = h_prev / h (D' = D_i on the first and the final step).
    """
    previous, h_prev = None, None
    for i in _steps(sigmas, progress, "dpmpp_2m"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = torch.log(sigma) - torch.log(sigma_next)
        estimate = denoised
        if previous is not None:
            r = h_prev / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
        previous, h_prev = denoised, h
    return x


SAMPLERS = {"euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "dpmpp_2m": dpmpp_2m}


def get_sampler(name: str):
    """Look up a sampler by name, with a one-line error listing the choices."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
