"""Tiled autoencoding: encode and decode big images tile by tile, blended over overlaps (``latentup.tiling``).

Tiles are ``tile`` latent pixels wide (``tile × downscale`` image pixels) and overlap by ``overlap`` latent
pixels. Decoding blends image tiles; encoding blends the encoder moments (mean ‖ log-variance for a KL VAE), so the
posterior sample still draws one noise tensor for the whole latent, as an untiled encode does. Convolutions near a
tile border see less context and a KL VAE's GroupNorm statistics are per tile, so a tiled result differs slightly
from an untiled one; the blend keeps that difference smooth (no seams).
"""

from torch import Tensor

from latentup.tiling import blend_tiles


def decode_tiled(autoencoder, z: Tensor, tile: int, overlap: int) -> Tensor:
    """``autoencoder._decode_raw`` of a native latent [B, C, h, w], tile by tile -> image [B, 3, h·f, w·f]."""
    def decode(ys: slice, xs: slice) -> Tensor:
        return autoencoder._decode_raw(z[..., ys, xs])

    return blend_tiles(decode, *z.shape[-2:], tile, overlap, scale=autoencoder.downscale)


def encode_tiled(autoencoder, image01: Tensor, tile: int, overlap: int) -> Tensor:
    """``autoencoder._encode_raw`` of an image [B, 3, H, W] (sides multiples of the downscale f), tile by tile."""
    f = autoencoder.downscale

    def encode(ys: slice, xs: slice) -> Tensor:
        return autoencoder._encode_raw(image01[..., ys, xs])

    return blend_tiles(encode, *image01.shape[-2:], tile * f, overlap * f, scale=1 / f, align=f)
