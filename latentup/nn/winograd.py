"""Winograd F(4×4, 3×3): the U-Net's 3×3 convolutions with 4× fewer multiplications, for CPU float32 inference.

A 3×3, stride-1, padding-1 convolution is computed on 6×6 input tiles d taken with stride 4 (Lavin & Gray 2016):

    Y = Aᵀ [ Σ_c (G w_kc Gᵀ) ⊙ (Bᵀ d_c B) ] A          4×4 outputs per tile and output channel k

The channel sum is 36 matrix products [tiles, C_in] × [C_in, C_out] (one per position of the 6×6 transform), so an
output costs 36/16 · C_in multiply-adds instead of 9 · C_in. Interpolation points 0, ±1, ±2, ∞; in float32 the
result is within ~2e-5 of the direct convolution, relative to the largest output. Tiles are transformed in chunks
of ~``CHUNK_TILES`` so that a chunk's transformed data stays in cache. On this project's CPUs oneDNN's direct
convolution already runs at the matmul rate, so this is the one way left to do the same layer faster (1.5–2.2× on
the released U-Net's shapes; docs/performance.md). The price: the cached transformed filter is 4× the weight
(36 vs 9 values per filter), and computing it (one [36, 9] × [9, C_out·C_in] product, ~40 ms for a 768×768 filter
on one core) before the first call. So a layer switches to Winograd only where it pays (measured, one thread): at
least ``MIN_CHANNELS`` input channels (128–192-channel convs ran at 0.8–1.2× of direct, 256 at 1.1–1.6×, 384 at
1.7–2×) and calls of at least ``MIN_TILES`` 4×4 output tiles (batch · H · W / 16; a 768-channel 8×8 map at batch 2,
8 tiles, ran at 0.7–0.95×); its filter is transformed at its first such call (lazily: the deepest levels of a small
latent never pay for one). GPUs keep their own (cuDNN) algorithms.
"""

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_TILES = 128
MIN_TILES = 16
MIN_CHANNELS = 256
_B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def transform_filter(weight: Tensor) -> Tensor:
    """U = G w Gᵀ of a [C_out, C_in, 3, 3] filter, as [36, C_out, C_in]: one product (G ⊗ G) · w_flatᵀ of
    [36, 9] × [9, C_out·C_in] (row-major 3×3 → 6×6), in the weight's dtype (float32: within 1e-7 relative)."""
    c_out, c_in = weight.shape[:2]
    flat = weight.detach().reshape(c_out * c_in, 9)
    return torch.mm(_kron(_G, weight.dtype, weight.device), flat.t()).view(36, c_out, c_in)


def pays(x: Tensor) -> bool:
    """Whether Winograd beats the direct convolution for x [B, C, H, W]: at least MIN_CHANNELS channels and
    MIN_TILES 4×4 output tiles."""
    b, c, h, w = x.shape
    return c >= MIN_CHANNELS and b * (h // 4) * (w // 4) >= MIN_TILES


@cache
def _kron(rows: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """M ⊗ M: applies ``rows`` along both axes of a flattened (row-major) tile."""
    m = torch.tensor(rows, dtype=torch.float64)
    return torch.kron(m, m).to(dtype=dtype, device=device)


def _tile_rows(padded: Tensor, filt: Tensor, out: Tensor) -> None:
    """Convolve NHWC padded input rows [B, 4n+2, 4m+2, C_in] into ``out`` [B, 4n, 4m, C_out] (an NHWC view).

    The 6×6 tiles are gathered as D [36, tiles·C_in]; V = (Bᵀ ⊗ Bᵀ) D and Y = (Aᵀ ⊗ Aᵀ) (V ⋆ U) are dense
    matrix products (≈ 10 % and 4 % of the main product's work), faster here than sparse element-wise passes.
    """
    b, n, m, c = padded.shape[0], (padded.shape[1] - 2) // 4, (padded.shape[2] - 2) // 4, padded.shape[3]
    tiles = torch.empty(36, b, n, m, c, dtype=padded.dtype)
    for r in range(6):
        for s in range(6):
            tiles[6 * r + s] = padded[:, r : r + 4 * n : 4, s : s + 4 * m : 4]
    v = torch.mm(_kron(_B_T, padded.dtype, padded.device), tiles.view(36, -1)).view(36, b * n * m, c)
    y = torch.mm(_kron(_A_T, padded.dtype, padded.device), torch.bmm(v, filt.transpose(1, 2)).view(36, -1))
    y, blocks = y.view(4, 4, b, n, m, -1), out.view(b, n, 4, m, 4, out.shape[-1])
    for i in range(4):
        for j in range(4):
            blocks[:, :, i, :, j] = y[i, j]


def winograd_conv3x3(x: Tensor, filt: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, w, bias, padding=1) for x [B, C_in, H, W] with H, W multiples of 4 and filt = transform_filter(w)."""
    b, c, h, w = x.shape
    padded = x.new_zeros(b, h + 2, w + 2, c)
    padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    out = x.new_empty(b, h, w, filt.shape[1])
    step = max(1, CHUNK_TILES // (b * (w // 4)))
    for r in range(0, h // 4, step):
        n = min(step, h // 4 - r)
        _tile_rows(padded[:, 4 * r : 4 * (r + n) + 2], filt, out[:, 4 * r : 4 * (r + n)])
    result = x.new_empty(b, filt.shape[1], h, w)
    if bias is None:
        return result.copy_(out.permute(0, 3, 1, 2))
    return torch.add(out.permute(0, 3, 1, 2), bias[:, None, None], out=result)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(c_in, c_out, 3, padding=1) that, when ``winograd`` is set, evaluates float32 CPU inputs without
    gradients (sides multiples of 4) where it ``pays`` with Winograd F(4×4, 3×3); the transformed filter is made
    at the first such call and cached per weight version. Same parameters and state-dict keys as nn.Conv2d."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1)
        self.winograd = False
        self._filter: tuple[tuple, Tensor] | None = None

    def _transformed(self) -> Tensor:
        key = (self.weight._version, self.weight.data_ptr())
        if self._filter is None or self._filter[0] != key:
            self._filter = key, transform_filter(self.weight.detach())
        return self._filter[1]

    def forward(self, x: Tensor) -> Tensor:
        if (self.winograd and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
                and pays(x)):
            return winograd_conv3x3(x, self._transformed(), self.bias)
        return F.conv2d(x, self.weight, self.bias, padding=1)
