"""Low-resolution conditioning of the upscaler (SPEC §3.4, §4.3).

The low-res latent z_lr (optionally noise-augmented to z_lr + sigma_lr eps) reaches the U-Net twice:

    image_cond  = nearest_upsample_2x(z_lr) / sqrt(sigma_lr^2 + 1)          (concatenated to the input)
    noise_embed = [cos(2 pi log1p(sigma_lr) W), sin(2 pi log1p(sigma_lr) W)]  (W: fixed N(0, 2^2) weights [n, 1])

and ``mapping_cond = [noise_embed || pooled text]``. At sigma_lr = 0 the embedding is [1]*n + [0]*n for any W,
which is why diffusers' weights (which lack W) can only run sigma_lr = 0. :func:`denoiser_conditioning` builds the
denoiser's keyword arguments from these for training, validation and inference alike.
"""

import math

import torch
import torch.nn.functional as F

from latentup.errors import ConfigError

NOISE_EMBED_DIM = 128  # 2n: n = 64 Fourier frequencies of log1p(sigma_lr), std 2 (SPEC §4.3)


def pooled_width(mapping_cond_dim: int) -> int:
    """The pooled-text part of a U-Net's ``mapping_cond_dim`` (0 or NOISE_EMBED_DIM + pooled width)."""
    if 0 < mapping_cond_dim < NOISE_EMBED_DIM:
        raise ConfigError(f"mapping_cond_dim {mapping_cond_dim} must be 0 or {NOISE_EMBED_DIM} (noise-level "
                          "embedding) + the pooled text width")
    return max(0, mapping_cond_dim - NOISE_EMBED_DIM)


def noise_level_embedding(sigma_lr: torch.Tensor, weight: torch.Tensor | None, dim: int = NOISE_EMBED_DIM) -> torch.Tensor:
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


def low_res_conditioning(low_res: torch.Tensor, sigma_lr, noise_weight: torch.Tensor | None = None,
                         dim: int = NOISE_EMBED_DIM):
    """(image_cond [B, C, 2h, 2w], noise_embed [B, dim]) for an (already augmented) low-res latent."""
    sigma_lr = torch.as_tensor(sigma_lr, dtype=torch.float32, device=low_res.device).expand(low_res.shape[0])
    scale = (sigma_lr**2 + 1) ** -0.5
    image_cond = F.interpolate(low_res, scale_factor=2, mode="nearest") * scale[:, None, None, None].to(low_res.dtype)
    return image_cond, noise_level_embedding(sigma_lr, noise_weight, dim).to(low_res.dtype)


def augment_low_res(low_res: torch.Tensor, sigma_lr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gaussian noise augmentation z_lr + sigma_lr eps (variance-exploding, as the c_in_lr scaling assumes)."""
    return low_res + sigma_lr.reshape(-1, 1, 1, 1).to(low_res) * noise


def denoiser_conditioning(low_res: torch.Tensor, sigma_lr: torch.Tensor, noise_weight: torch.Tensor | None,
                          mapping_cond_dim: int, *, lr_noise: torch.Tensor | None = None,
                          pooled: torch.Tensor | None = None, context: torch.Tensor | None = None,
                          context_mask: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> dict:
    """The denoiser's keyword arguments for a low-res latent at augmentation levels ``sigma_lr`` [B]:

    image_cond and mapping_cond = [noise_embed || pooled] (None for a U-Net without ``mapping_cond_dim``; pooled
    only for text-conditioned ones), the text context and mask passed through. With ``lr_noise`` (eps, shaped like
    the latent) the latent is augmented to z_lr + sigma_lr eps first (in its own dtype); the conditioning is in
    ``dtype`` (default: the latent's).
    """
    if lr_noise is not None:
        low_res = augment_low_res(low_res, sigma_lr, lr_noise)
    low_res = low_res.to(dtype or low_res.dtype)
    image_cond, noise_embed = low_res_conditioning(low_res, sigma_lr, noise_weight)
    mapping = None
    if mapping_cond_dim:
        mapping = noise_embed if pooled is None else torch.cat([noise_embed, pooled.to(noise_embed.dtype)], dim=1)
    return {"image_cond": image_cond, "mapping_cond": mapping, "context": context, "context_mask": context_mask}
