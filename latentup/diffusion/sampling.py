"""The one sampling entry of inference, validation and serving:

    x_0 = sigma_0 n,   x = sampler(guided(D, cond, g, uncond), x_0, sigmas)

for unit noise n, a denoiser D (``prepare`` is used when it has one), the conditioning of each half (uncond only
for guidance, ``latentup.diffusion.guidance``) and a sampler by name with its options.
"""

import torch

from latentup.diffusion.guidance import guided
from latentup.diffusion.samplers import get_sampler


@torch.no_grad()
def sample(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond: dict, *, sampler: str = "euler",
           sampler_options: dict | None = None, cfg_scale: float = 0.0, uncond: dict | None = None,
           fresh_noise=None, progress=False) -> torch.Tensor:
    """The sampled latent for unit initial noise ``noise`` [B, C, H, W]. ``fresh_noise(x)``: N(0, I) shaped like x
    (ancestral samplers); ``progress``: see ``latentup.diffusion.samplers``."""
    model = guided(denoiser, cond, cfg_scale, uncond, prepare=getattr(denoiser, "prepare", None))
    step = get_sampler(sampler, **(sampler_options or {}))
    return step(model, noise * sigmas[0], sigmas, noise=fresh_noise, progress=progress)
