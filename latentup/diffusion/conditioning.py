"""Low-resolution conditioning of the upscaler (SPEC §3.4, §4.3).

The low-res latent z_lr (optionally noise-augmented to z_lr + sigma_lr eps) reaches the U-Net twice:

    image_cond  = nearest_upsample_2x(z_lr) / sqrt(sigma_lr^2 + 1)          (concatenated to the input)
    noise_embed = [cos(2 pi log1p(sigma_lr) W), sin(2 pi log1p(sigma_lr) W)]  (W: fixed N(0, 2^2) weights [n, 1])

and ``mapping_cond = [noise_embed || pooled text]``. At sigma_lr = 0 the embedding is [1]*n + [0]*n for any W,
which is why diffusers' weights (which lack W) can only run sigma_lr = 0.
"""

import math

import torch
import torch.nn.functional as F

from latentup.errors import ConfigError


def noise_level_embedding(sigma_lr: torch.Tensor, weight: torch.Tensor | None, dim: int = 128) -> torch.Tensor:
    """Fourier features [B, 2n] of log1p(sigma_lr); ``weight`` [n, 1] may be None only when sigma_lr is 0."""
    if weight is None:
        if bool((sigma_lr != 0).any()):
            raise ConfigError(
                "noise_level > 0 needs the low-res noise Fourier weights, which these weights lack "
                "(diffusers-format weights only support noise_level=0); use a k-diffusion or latentup checkpoint"
            )
        ones = sigma_lr.new_ones(sigma_lr.shape[0], dim // 2)
        return torch.cat([ones, torch.zeros_like(ones)], dim=1)
    f = 2 * math.pi * torch.log1p(sigma_lr)[:, None] * weight.to(sigma_lr)[:, 0][None]
    return torch.cat([f.cos(), f.sin()], dim=1)


def low_res_conditioning(low_res: torch.Tensor, sigma_lr, noise_weight: torch.Tensor | None = None, dim: int = 128):
    """(image_cond [B, C, 2h, 2w], noise_embed [B, dim]) for an (already augmented) low-res latent."""
    sigma_lr = torch.as_tensor(sigma_lr, dtype=torch.float32, device=low_res.device).expand(low_res.shape[0])
    scale = (sigma_lr**2 + 1) ** -0.5
    image_cond = F.interpolate(low_res, scale_factor=2, mode="nearest") * scale[:, None, None, None].to(low_res.dtype)
    return image_cond, noise_level_embedding(sigma_lr, noise_weight, dim).to(low_res.dtype)


def augment_low_res(low_res: torch.Tensor, sigma_lr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gaussian noise augmentation z_lr + sigma_lr eps (variance-exploding, as the c_in_lr scaling assumes)."""
    return low_res + sigma_lr.reshape(-1, 1, 1, 1).to(low_res) * noise
