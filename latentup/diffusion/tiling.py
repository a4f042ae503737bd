"""Memory-bounded denoising: D evaluated on overlapping latent tiles once the latent outgrows a tile.

    D(x; σ) ≈ Σ_t w_t · D(x_t; σ, image_cond_t) / Σ_t w_t     (``latentup.tiling`` weights, sin² ramps)

Convolutions and cross-attention are local, but the deepest level's self-attention (1/8 resolution) sees one tile
instead of the whole latent, so a tiled result differs slightly from the untiled one; smaller latents take the
exact untiled path.
"""

from torch import Tensor, nn

from latentup.tiling import blend_tiles


class TiledDenoiser(nn.Module):
    """Wraps a denoiser ``D(x, sigma, image_cond, **cond)``: latents with a side above ``tile`` run tile by tile.

    ``overlap`` (default tile / 4) is the latent pixels neighbouring tiles share; tile offsets are multiples of
    ``align`` (the U-Net's size rule: 2^(levels-1)).
    """

    def __init__(self, denoiser: nn.Module, tile: int, overlap: int | None = None, align: int = 8):
        super().__init__()
        self.denoiser, self.tile, self.align = denoiser, tile, align
        self.overlap = tile // 4 if overlap is None else overlap

    def prepare(self, **cond) -> dict:
        return self.denoiser.prepare(**cond)

    def forward(self, x: Tensor, sigma: Tensor, image_cond: Tensor, **cond) -> Tensor:
        height, width = x.shape[-2:]
        if max(height, width) <= self.tile:
            return self.denoiser(x, sigma, image_cond, **cond)

        def denoise(ys: slice, xs: slice) -> Tensor:
            return self.denoiser(x[..., ys, xs], sigma, image_cond[..., ys, xs], **cond)

        return blend_tiles(denoise, height, width, self.tile, self.overlap, align=self.align)
