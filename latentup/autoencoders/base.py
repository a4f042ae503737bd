"""The interface every autoencoder shares: [0, 1] images in, SD-scaled latents out, and back.

An autoencoder implements two hooks on its *native* latent space (so that tiling can wrap them):
``_encode_raw(image01) -> moments`` and ``_decode_raw(z) -> image01`` (unclamped). ``_posterior``
splits the moments into a mean and a standard deviation (None for a deterministic encoder).
The base class turns native latents into the latents a diffusion model expects:

    latent = (z - shift_factor) * scaling_factor,    z = latent / scaling_factor + shift_factor.

Setting ``tile_size`` (latent pixels) makes ``encode`` / ``decode`` of anything with a longer side work in
overlapping tiles of that side (``tiling.py``), which bounds their memory.
"""

import torch
from torch import Tensor, nn

from latentup.autoencoders.tiling import decode_tiled, encode_tiled
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
    tile_size: int | None = None  # latent side above which encode/decode run tiled; None: never
    tile_overlap: int | None = None  # latent pixels shared by neighbouring tiles; None: tile_size // 4

    def _encode_raw(self, image01: Tensor) -> Tensor:
        """Encoder moments in the native latent space (for a KL VAE: [mean || logvar] on channels)."""
        raise NotImplementedError

    def _decode_raw(self, z: Tensor) -> Tensor:
        """Native latent -> image, roughly in [0, 1], not clamped."""
        raise NotImplementedError

    def _posterior(self, moments: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean, std) of the native latent; a deterministic encoder returns (moments, None)."""
        return moments, None

    def encode(self, image01: Tensor, generator: Generators = None, sample: bool = True, noise=None) -> Tensor:
        """SD-scaled latent of ``image01``: z = mean + std * eps, or the mean. eps as diffusers draws it from
        ``generator``, or ``noise(shape)`` when given (e.g. counter-based draws in training)."""
        mean, std = self._posterior(self._moments(image01))
        z = mean
        if sample and std is not None:
            shape = tuple(mean.shape)
            z = mean + std * (noise(shape).to(mean) if noise else randn(shape, generator, mean.device, mean.dtype))
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latent: Tensor) -> Tensor:
        """Image in [0, 1] (clamped) of an SD-scaled latent."""
        z = latent / self.scaling_factor + self.shift_factor
        image = decode_tiled(self, z, *self._tiling()) if self._tiled(z.shape[-2:]) else self._decode_raw(z)
        return image.clamp(0, 1)

    def _moments(self, image01: Tensor) -> Tensor:
        if self._tiled([side // self.downscale for side in image01.shape[-2:]]):
            return encode_tiled(self, image01, *self._tiling())
        return self._encode_raw(image01)

    def _tiled(self, latent_size) -> bool:
        return self.tile_size is not None and max(latent_size) > self.tile_size

    def _tiling(self) -> tuple[int, int]:
        return self.tile_size, self.tile_size // 4 if self.tile_overlap is None else self.tile_overlap
