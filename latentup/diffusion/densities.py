"""Training-time random draws: counter-based uniforms and normals, and the noise-level densities.

Every training draw is a pure function of (key, stream position p, index j), with no generator state, so a sample's
draws do not depend on the batch, rank or (resumed) run it lands in, and a whole batch is drawn on the device with
a few elementwise integer ops:

    c = p·2^20 + j                          (one counter per draw: unique for j < 2^20 words, p < 2^43)
    w = f(f(k + c·γ))                       (γ = 0x9E3779B97F4A7C15, k: a 64-bit key from the run seed)
    f(x): x ← (x ⊕ x≫30)·0xBF58476D1CE4E5B9,  x ← (x ⊕ x≫27)·0x94D049BB133111EB,  x ⊕ x≫31

f is SplitMix64's finaliser (a bijection of 64-bit words with full avalanche), so f(k + c·γ) is output c of
SplitMix64 seeded with k; the second round decorrelates the strided counters of neighbouring samples. Words are
int64 tensors: products wrap mod 2^64 (two's complement) and ≫ is a logical shift; the words are the same on
every device.

A word gives two uniforms from disjoint 23-bit fields m: u = (m + ½)/2^23 ∈ [2^-24, 1 - 2^-24], exact in float32;
a pair gives two independent standard normals (Box–Muller):

    z₁ = √(-2 ln u₁)·cos 2πu₂,   z₂ = √(-2 ln u₁)·sin 2πu₂      (|z| ≤ 5.77: the tails beyond hold p < 1e-8)

The densities map one uniform pair per sample, u [n, 2], to noise levels:

- sigma ~ LogNormal(mean, std): ln sigma ~ N(-0.5, 1.2^2) for the released model (SPEC §5.1).
- sigma_lr (low-res noise augmentation): 0 with probability ``p_zero``, otherwise U(0, max) (SPEC §5.4).
"""

import math

import torch
from torch import Tensor

WORD_BITS = 20  # counter bits of the index j within a sample
_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # the 64-bit constants as signed int64 (same bits)
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_xor_(x: Tensor, shift: int) -> Tensor:
    """x ← x ⊕ (x ≫ shift) in place, ≫ logical (int64's ≫ is arithmetic: mask the sign copies)."""
    return x.bitwise_xor_((x >> shift).bitwise_and_((1 << (64 - shift)) - 1))


def _finalise_(x: Tensor) -> Tensor:
    """x ← f(x) in place (SplitMix64's finaliser; in place halves the CPU time of big batches)."""
    return _shift_xor_(_shift_xor_(_shift_xor_(x, 30).mul_(_MIX1), 27).mul_(_MIX2), 31)


def random_words(key: int, positions: Tensor, n: int) -> Tensor:
    """Words w[b, j] = f(f(key + (p_b·2^20 + j)·γ)), int64 [B, n], on the positions' device."""
    if n > 1 << WORD_BITS:
        raise ValueError(f"{n} words per sample: at most 2^{WORD_BITS}")
    counters = (positions.long()[:, None] << WORD_BITS) + torch.arange(n, device=positions.device)
    return _finalise_(_finalise_(counters.mul_(_GAMMA).add_(key)))


def uniform_pairs(words: Tensor) -> Tensor:
    """Two uniforms per word, [..., 2] float32: bits 41-63 and 9-31 as (m + ½)/2^23."""
    fields = torch.stack([words >> 41, words >> 9], dim=-1).bitwise_and_(2**23 - 1)
    return fields.float().add_(0.5).mul_(2.0**-23)


def box_muller(u: Tensor) -> Tensor:
    """Two independent standard normals [..., 2] per uniform pair u [..., 2]."""
    radius = u[..., 0].log().mul_(-2).sqrt_()
    angle = u[..., 1] * (2 * math.pi)
    return torch.stack([angle.cos().mul_(radius), angle.sin_().mul_(radius)], dim=-1)


def standard_normal(key: int, positions: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Standard normals [B, *shape]: row b depends only on (key, positions[b])."""
    n = math.prod(shape)
    z = box_muller(uniform_pairs(random_words(key, positions, (n + 1) // 2))).flatten(1)
    return z[:, :n].reshape(-1, *shape)


def lognormal(u: Tensor, mean: float = -0.5, std: float = 1.2) -> Tensor:
    """Noise levels with ln sigma ~ N(mean, std^2), one per uniform pair u [n, 2]."""
    return (box_muller(u)[..., 0] * std + mean).exp()


def low_res_sigma(u: Tensor, p_zero: float = 0.5, maximum: float = 0.6) -> Tensor:
    """Augmentation levels, one per uniform pair u [n, 2]: 0 where u₁ < p_zero, else u₂·maximum ~ U(0, maximum)."""
    return torch.where(u[..., 0] < p_zero, 0.0, u[..., 1] * maximum)
