"""Karras/EDM preconditioning: a U-Net F becomes a denoiser D(x; sigma) -> x0 (Karras et al. 2022, SPEC §4.4).

    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2)
    c_noise = ln(sigma) / 4,           D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)

F receives ``[c_in x || image_cond]`` on the channel axis. When F has one extra output channel, its spatial mean
is a per-sample log-variance u used by the training loss (k-diffusion's DenoiserWithVariance):

    T = (x0 - c_skip (x0 + sigma n)) / c_out,   L = mean_CHW [ (F - T)^2 e^(-u) + u ] / 2,

which is the EDM weighting lambda(sigma) = 1/c_out^2 in D-space, with a learned uncertainty.
"""

import torch
from torch import nn


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


class KarrasDenoiser(nn.Module):
    """Wraps a U-Net ``F(x, c_noise, mapping_cond, context, context_mask)`` as ``D(x, sigma, **cond) -> x0``."""

    def __init__(self, unet: nn.Module, sigma_data: float = 1.0):
        super().__init__()
        self.unet = unet
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in) for sigma (broadcastable to the latent)."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total**0.5, total**-0.5

    def prepare(self, image_cond, mapping_cond=None, context=None, context_mask=None) -> dict:
        """Conditioning for a whole sampling call, with the U-Net's per-call constants computed once
        (``UNet.condition``); pass the result to every step as ``**cond``."""
        return {"image_cond": image_cond, "conditioning": self.unet.condition(mapping_cond, context, context_mask)}

    def network(self, x, sigma, image_cond, mapping_cond=None, context=None, context_mask=None,
                conditioning=None) -> torch.Tensor:
        """Raw U-Net output for the noisy latent x at noise level sigma (scalar or [B])."""
        _, _, c_in = self.scalings(_per_sample(sigma, x))
        c_noise = torch.log(sigma) * 0.25
        net_in = torch.cat([(x * c_in).to(image_cond.dtype), image_cond], dim=1)
        if conditioning is not None:
            return self.unet(net_in, c_noise, conditioning=conditioning)
        return self.unet(net_in, c_noise, mapping_cond=mapping_cond, context=context, context_mask=context_mask)

    def forward(self, x, sigma, image_cond, mapping_cond=None, context=None, context_mask=None,
                conditioning=None) -> torch.Tensor:
        """D(x; sigma): the denoised latent, in float32 when x is float32."""
        out = self.network(x, sigma, image_cond, mapping_cond, context, context_mask, conditioning)
        c_skip, c_out, _ = self.scalings(_per_sample(sigma, x))
        return c_skip * x + c_out * out[:, : x.shape[1]]

    def loss(self, x0, noise, sigma, image_cond, mapping_cond=None, context=None, context_mask=None) -> torch.Tensor:
        """Per-sample DenoiserWithVariance loss [B] (plain EDM-weighted MSE when F has no variance channel)."""
        return self.loss_and_denoised(x0, noise, sigma, image_cond, mapping_cond, context, context_mask)[0]

    def loss_and_denoised(self, x0, noise, sigma, image_cond, mapping_cond=None, context=None,
                          context_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss [B], D(x0 + sigma n; sigma)) from one U-Net call."""
        s = _per_sample(sigma, x0)
        noised = x0 + noise * s
        out = self.network(noised, sigma, image_cond, mapping_cond, context, context_mask).float()
        c_skip, c_out, _ = self.scalings(s)
        target = (x0 - c_skip * noised) / c_out
        channels = x0.shape[1]
        mse = (out[:, :channels] - target).pow(2).flatten(1).mean(1)
        denoised = c_skip * noised + c_out * out[:, :channels]
        if out.shape[1] == channels:
            return mse, denoised
        logvar = out[:, channels:].flatten(1).mean(1)
        return 0.5 * (mse * torch.exp(-logvar) + logvar), denoised
