"""Samplers: plain functions ``sampler(model, x, sigmas, *, noise=None, progress=False, **options) -> x``.

``model(x, sigma) -> x0`` is a denoiser (guidance already applied); ``sigmas`` is a decreasing grid whose first
entry is the noise level of ``x``; ``noise(x)`` returns fresh N(0, I) noise shaped like x (ancestral samplers
only); ``progress``: True for a bar of the sampler's own, or a callable called after each step (a caller's bar).
Options are the sampler's further keyword arguments (e.g. euler_ancestral's ``eta``). Arithmetic is float32. With
d = (x - D(x; s)) / s the probability-flow ODE is dx/ds = d.

The noise levels live on x's device and branches read a host copy, so the step loop never waits for the device.
"""

import inspect
from functools import partial

import torch
from tqdm.auto import tqdm

from latentup.errors import ConfigError


def _steps(sigmas: torch.Tensor, x: torch.Tensor, progress, name: str):
    """(sigma, sigma_next, whether sigma_next is 0) per step; the sigmas on x's device, the test on the host."""
    on_device, zero = sigmas.to(x.device), [s == 0 for s in sigmas.tolist()]
    for i in tqdm(range(len(sigmas) - 1), desc=name, disable=progress is not True, leave=False):
        yield on_device[i], on_device[i + 1], zero[i + 1]
        if callable(progress):
            progress()


@torch.no_grad()
def euler(model, x, sigmas, *, noise=None, progress=False):
    """Euler: x <- x + d (s_next - s). Bit-for-bit diffusers' EulerDiscreteScheduler step (gamma = 0)."""
    for sigma, sigma_next, _ in _steps(sigmas, x, progress, "euler"):
        derivative = (x - model(x, sigma)) / sigma
        x = x + derivative * (sigma_next - sigma)
    return x


@torch.no_grad()
def euler_ancestral(model, x, sigmas, *, noise=None, progress=False, eta: float = 1.0):
    """Euler ancestral: step down to s_down, then add noise of std s_up, with s_down^2 + s_up^2 = s_next^2."""
    if noise is None:
        raise ConfigError("euler_ancestral needs a noise source (noise=...)")
    for sigma, sigma_next, to_zero in _steps(sigmas, x, progress, "euler_ancestral"):
        denoised = model(x, sigma)
        sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if not to_zero:
            x = x + noise(x) * sigma_up
    return x


@torch.no_grad()
def heun(model, x, sigmas, *, noise=None, progress=False):
    """Heun (EDM Alg. 1, no churn): Euler predictor, trapezoidal corrector; the last step to 0 is plain Euler."""
    for sigma, sigma_next, to_zero in _steps(sigmas, x, progress, "heun"):
        d = (x - model(x, sigma)) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if to_zero:
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
    for sigma, sigma_next, to_zero in _steps(sigmas, x, progress, "dpmpp_2m"):
        denoised = model(x, sigma)
        if to_zero:
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


def get_sampler(name: str, **options):
    """Look up a sampler by name, with its ``options`` bound; one-line errors listing the choices."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    known = [p for p in inspect.signature(sampler).parameters if p not in ("model", "x", "sigmas", "noise", "progress")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"sampler {name} has no option {', '.join(unknown)}: its options are "
                          f"{', '.join(known) or 'none'}")
    return partial(sampler, **options) if options else sampler
