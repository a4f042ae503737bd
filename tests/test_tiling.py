"""Tiling: the blend is a partition of unity, small inputs take the exact path, and a tiled decode of a smooth
gradient (real TAESD weights) has no step at the tile borders above the decoder's own noise level."""

import itertools

import pytest
import torch

from latentup.diffusion.tiling import TiledDenoiser
from latentup.errors import InputError
from latentup.tiling import blend_tiles, tile_starts


@pytest.mark.parametrize("size,tile,overlap,align", [(64, 64, 16, 8), (72, 32, 8, 8), (200, 64, 16, 8), (40, 16, 4, 1)])
def test_tile_starts_cover_the_input_with_aligned_overlapping_tiles(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    side = min(tile, size)
    assert starts[0] == 0 and starts[-1] + side == size
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= side - overlap + align for a, b in itertools.pairwise(starts))  # gaps: none, overlap kept


def test_tile_starts_reject_misaligned_sizes():
    with pytest.raises(InputError, match="multiple of 8"):
        tile_starts(100, 32, 8, align=8)


@pytest.mark.parametrize("scale", [1, 8, 1 / 8])
def test_blend_of_a_tiling_invariant_function_is_exact(scale):
    """A function that commutes with cropping (here: nearest resize) blends back to its untiled output."""
    x = torch.randn(2, 3, 96, 80)

    def resize(t: torch.Tensor) -> torch.Tensor:
        return t if scale == 1 else torch.nn.functional.interpolate(t, scale_factor=scale, mode="nearest")

    out = blend_tiles(lambda ys, xs: resize(x[..., ys, xs]), 96, 80, 32, 8, scale=scale, align=8)
    torch.testing.assert_close(out, resize(x), rtol=0, atol=1e-6)


def test_tiled_denoiser_slices_latent_and_image_cond_together():
    def pointwise(x, sigma, image_cond, conditioning):
        return torch.tanh(x) * sigma + image_cond * conditioning

    x, image_cond, cond = torch.randn(2, 4, 48, 40), torch.randn(2, 4, 48, 40), torch.tensor(0.5)
    tiled = TiledDenoiser(pointwise, tile=16, overlap=8)
    expected = pointwise(x, 2.0, image_cond, cond)
    torch.testing.assert_close(tiled(x, 2.0, image_cond, conditioning=cond), expected, rtol=0, atol=1e-6)


def test_tiled_denoiser_is_exact_below_the_tile_and_close_above():
    from test_speed_paths import inputs, small_unet

    from latentup.diffusion.precond import KarrasDenoiser

    denoiser = KarrasDenoiser(small_unet())
    x, _, mapping_cond, context, mask = inputs(size=32)
    cond = denoiser.prepare(x[:, 4:], mapping_cond, context, mask)
    latent, sigma = x[:, :4] * 2, torch.tensor(2.0)
    with torch.no_grad():
        expected = denoiser(latent, sigma, **cond)
        assert torch.equal(TiledDenoiser(denoiser, tile=32)(latent, sigma, **cond), expected)
        tiled = TiledDenoiser(denoiser, tile=16, overlap=8)(latent, sigma, **cond)
        abutting = TiledDenoiser(denoiser, tile=16, overlap=0)(latent, sigma, **cond)
    rel, rel_abutting = [((t - expected).norm() / expected.norm()).item() for t in (tiled, abutting)]
    print(f"U-Net on 16-px tiles of a 32-px latent: relative L2 difference {rel:.3f}, abutting {rel_abutting:.3f}")
    assert tiled.shape == expected.shape
    assert rel < 0.25 and rel < 0.85 * rel_abutting  # measured 0.213 vs 0.281: random weights, the smallest tiles


@pytest.fixture(scope="module")
def taesd():
    from latentup.autoencoders import TAESD

    return TAESD.from_weights_folder("sd").eval()


def gradient(height=256, width=512) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return (torch.stack([x, y, (x + y) / 2])[None] * 0.8 + 0.1)


def steps(image: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean step across each row (axis -2) or column (axis -1) boundary: a seam is a spike in it."""
    return image.diff(dim=axis).mean(dim=[d for d in range(4) if d != axis % 4])


def border_steps(taesd, z, overlap: int) -> list[float]:
    """Per axis (rows, columns): the largest deviation of the step at a tile border from the median step, in units
    of the noise level (robust std) of the untiled decode's step profile along that axis."""
    full = taesd.decode(z)
    taesd.tile_size, taesd.tile_overlap = 16, overlap
    try:
        tiled = taesd.decode(z)
    finally:
        taesd.tile_size = taesd.tile_overlap = None
    ratios = []
    for axis in (-2, -1):
        starts = tile_starts(z.shape[axis], 16, overlap)
        borders = sorted({8 * s for s in starts[1:]} | {8 * (s + 16) for s in starts[:-1]})
        profile, reference = steps(tiled, axis), steps(full, axis)
        noise = 1.4826 * (reference - reference.median()).abs().median()
        ratios.append(((profile[[b - 1 for b in borders]] - profile.median()).abs().max() / noise).item())
    return ratios


def test_tiled_decode_has_no_seams(taesd):
    with torch.no_grad():
        z = taesd.encode(gradient())
        blended, hard = border_steps(taesd, z, overlap=8), border_steps(taesd, z, overlap=0)
    print(f"step at tile borders / noise level (rows, columns): blended {blended[0]:.1f}, {blended[1]:.1f}; "
          f"abutting tiles {hard[0]:.0f}, {hard[1]:.0f}")
    assert max(blended) < 5  # at the noise level
    assert min(hard) > 30  # the measure does see a seam when there is one


def test_tiled_decode_and_encode_stay_close_to_untiled(taesd):
    image = gradient(256, 384)
    with torch.no_grad():
        z = taesd.encode(image)
        full = taesd.decode(z)
        taesd.tile_size = 48  # = the latent's longer side: one tile, the exact path
        assert torch.equal(taesd.decode(z), full) and torch.equal(taesd.encode(image), z)
        taesd.tile_size, taesd.tile_overlap = 16, 8
        tiled, z_tiled = taesd.decode(z), taesd.encode(image)
        taesd.tile_size = taesd.tile_overlap = None
    image_err, latent_err = (tiled - full).abs(), (z_tiled - z).abs()
    print(f"tiled decode |Δ| mean {image_err.mean():.4f} max {image_err.max():.4f}; "
          f"tiled encode |Δ| mean {latent_err.mean():.4f} (latent std {z.std():.2f})")
    assert image_err.mean() < 0.02 and image_err.max() < 0.1  # 128-px tiles: the border context is cut often
    assert latent_err.mean() < 0.1 * z.std()
