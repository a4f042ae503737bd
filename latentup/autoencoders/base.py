"""The interface every autoencoder shares: [0, 1] images in, SD-scaled latents out, and back.

An autoencoder implements two hooks on its *native* latent space (so that tiling can wrap them):
``_encode_raw(image01) -> moments`` and ``_decode_raw(z) -> image01`` (unclamped). ``_posterior``
splits the moments into a mean and a standard deviation (None for a deterministic encoder).
The base class turns native latents into the latents a diffusion model expects:

    latent = (z - shift_factor) * scaling_factor,    z = latent / scaling_factor + shift_factor.
"""

import torch
from torch import Tensor, nn

from latentup.errors import InputError

Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor`` draws it.

    One generator: one draw of the whole ``shape`` on the generator's device. A list: sample i is drawn
    from ``generator[i]`` with shape (1, ...). A CPU generator draws on the CPU; the result moves to ``device``.
    """
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise InputError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class Autoencoder(nn.Module):
    """Base autoencoder: ``encode`` [B,3,H,W] in [0,1] -> latent [B,C,H/8,W/8]; ``decode`` the reverse."""

    latent_channels: int
    downscale: int = 8
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def _encode_raw(self, image01: Tensor) -> Tensor:
        """Encoder moments in the native latent space (for a KL VAE: [mean || logvar] on channels)."""
        raise NotImplementedError

    def _decode_raw(self, z: Tensor) -> Tensor:
        """Native latent -> image, roughly in [0, 1], not clamped."""
        raise NotImplementedError

    def _posterior(self, moments: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean, std) of the native latent; a deterministic encoder returns (moments, None)."""
        return moments, None

    def encode(self, image01: Tensor, generator: Generators = None, sample: bool = True) -> Tensor:
        """SD-scaled latent of ``image01``: z = mean + std * eps (eps as diffusers draws it), or the mean."""
        mean, std = self._posterior(self._encode_raw(image01))
        z = mean
        if sample and std is not None:
            z = mean + std * randn(tuple(mean.shape), generator, mean.device, mean.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latent: Tensor) -> Tensor:
        """Image in [0, 1] (clamped) of an SD-scaled latent."""
        return self._decode_raw(latent / self.scaling_factor + self.shift_factor).clamp(0, 1)
