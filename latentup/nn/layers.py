"""Building blocks of the K-diffusion U-Net (SPEC §2.2–2.3), named like diffusers' parameters.

Shapes: feature maps x [B, C, H, W]; conditioning vector emb [B, E]; context [B, T, D]; an attention bias
[B, 1, 1, T] is added to the cross-attention logits (0 = keep, -10000 = padding).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentup.nn.winograd import Conv3x3

GROUP_SIZE = 32
MASK_BIAS = -10000.0


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: C/32, at least 1."""
    return max(1, channels // GROUP_SIZE)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features: f = 2π·c·W, out = [cos f ‖ sin f] with W ~ N(0, std²) ∈ Rⁿ.

    W is an ``nn.Parameter`` with ``requires_grad=False`` (like diffusers' ``time_proj.weight``): it is saved with
    the weights and must never be re-drawn. Input [...] → output [..., 2n]; a float32 input gives float32
    features whatever the weight's dtype. On the meta device (a key list) nothing is drawn: randn and the product
    run there as Python reference kernels, whose first use imports torch._dynamo (~1.5 s).
    """

    def __init__(self, n: int, std: float = 1.0):
        super().__init__()
        meta = torch.get_default_device().type == "meta"
        self.weight = nn.Parameter(torch.empty(n) if meta else torch.randn(n) * std, requires_grad=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        f = c[..., None] * self.weight * (2 * math.pi)
        return torch.cat([f.cos(), f.sin()], dim=-1)


class TimeEmbedding(nn.Module):
    """emb = GELU(linear_2(GELU(linear_1(t_emb + m)))), m = cond_proj(mapping_cond); cond_dim = 0: no cond_proj.

    m does not depend on the noise level, so a sampler computes it once per call (``project``).
    """

    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim)
        self.cond_proj = nn.Linear(cond_dim, dim, bias=False) if cond_dim else None
        self.linear_2 = nn.Linear(dim, dim)

    def project(self, mapping_cond: torch.Tensor | None) -> torch.Tensor | None:
        """m = cond_proj(mapping_cond), or None without mapping_cond or cond_proj."""
        return None if mapping_cond is None or self.cond_proj is None else self.cond_proj(mapping_cond)

    def forward(self, t_emb: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        if projected is not None:
            t_emb = t_emb + projected
        return F.gelu(self.linear_2(F.gelu(self.linear_1(t_emb))))


class AdaGroupNorm(nn.Module):
    """y = GroupNorm(x; C/32 groups, eps 1e-5, no affine)·(1 + a) + b, with (a, b) = chunk₂(linear(emb)).

    For a contiguous (NCHW) x this is one GroupNorm over [1, B·C, H, W] with B·G groups and per-channel affine
    (1 + a, b): the same statistics, without a second pass over x. Other layouts (channels_last), and code under
    torch.compile (where the group count B·G would fix the batch size, and inductor fuses the affine itself),
    normalise first.
    """

    def __init__(self, emb_dim: int, channels: int):
        super().__init__()
        self.groups = group_count(channels)
        self.linear = nn.Linear(emb_dim, 2 * channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb).chunk(2, dim=1)
        if x.is_contiguous() and not torch.compiler.is_compiling():
            b, c, *size = x.shape
            y = F.group_norm(x.reshape(1, b * c, *size), b * self.groups, (1 + scale).flatten(), shift.flatten(), 1e-5)
            return y.view_as(x)
        scale, shift = scale[:, :, None, None], shift[:, :, None, None]
        return torch.addcmul(shift, F.group_norm(x, self.groups, eps=1e-5), 1 + scale)


class ResBlock(nn.Module):
    """k-diffusion ResConvBlock: h = conv2(GELU(norm2(conv1(GELU(norm1(x)))))) + skip(x), 3×3 convs.

    skip is a bias-free 1×1 conv ``conv_shortcut`` when c_in ≠ c_out, else the identity. The 3×3 convs can run
    as Winograd F(4×4, 3×3) on CPU (``winograd.py``).
    """

    def __init__(self, c_in: int, c_mid: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = AdaGroupNorm(emb_dim, c_in)
        self.conv1 = Conv3x3(c_in, c_mid)
        self.norm2 = AdaGroupNorm(emb_dim, c_mid)
        self.conv2 = Conv3x3(c_mid, c_out)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.gelu(self.norm1(x, emb)))
        h = self.conv2(F.gelu(self.norm2(h, emb)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Multi-head attention softmax(q·kᵀ/√d + bias)·v over tokens [B, N, C] (torch SDPA).

    Self-attention when ``context_dim`` is None; otherwise keys/values come from LayerNorm(context)
    (``norm_cross``). ``kv(context)`` depends on the text only, so a sampler computes it once per call and passes
    it as ``kv``. ``to_out`` is a one-element list only so that the keys read ``to_out.0.*`` as in diffusers.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.norm_cross = nn.LayerNorm(context_dim) if context_dim else None
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim or dim, dim)
        self.to_v = nn.Linear(context_dim or dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, T, d] of the tokens ``source`` (LayerNorm first for cross-attention)."""
        if self.norm_cross is not None:
            source = self.norm_cross(source)
        return self._split_heads(self.to_k(source)), self._split_heads(self.to_v(source))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k, v = kv if kv is not None else self.kv(x if context is None else context)
        q = self._split_heads(self.to_q(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class KAttentionBlock(nn.Module):
    """Attention without feed-forward: x += attn1(norm1(x)) (optional), then x += attn2(norm2(x), context).

    Feature maps become HW tokens through an NHWC view, which is free for channels_last inputs. ``kv``: the
    cross-attention's precomputed ``attn2.kv(context)`` (then ``context`` is not read).
    """

    def __init__(self, dim: int, heads: int, emb_dim: int, self_attn: bool, context_dim: int | None):
        super().__init__()
        self.norm1 = AdaGroupNorm(emb_dim, dim) if self_attn else None
        self.attn1 = Attention(dim, heads) if self_attn else None
        self.norm2 = AdaGroupNorm(emb_dim, dim) if context_dim else None
        self.attn2 = Attention(dim, heads, context_dim) if context_dim else None

    @staticmethod
    def _tokens(attn: Attention, x: torch.Tensor, *args) -> torch.Tensor:
        b, c, h, w = x.shape
        out = attn(x.permute(0, 2, 3, 1).reshape(b, h * w, c), *args)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def forward(self, x, emb, context=None, context_bias=None, kv=None) -> torch.Tensor:
        if self.attn1 is not None:
            x = x + self._tokens(self.attn1, self.norm1(x, emb))
        if self.attn2 is not None:
            x = x + self._tokens(self.attn2, self.norm2(x, emb), context, context_bias, kv)
        return x


_KERNEL_1D = (1 / 8, 3 / 8, 3 / 8, 1 / 8)


def blur_kernel(scale: float = 1.0) -> torch.Tensor:
    """(s·k)⊗(s·k) [4, 4] float32, k = [1,3,3,1]/8: products of dyadic fractions, exact in float32 (= torch.outer),
    made by a factory call only, so that a meta-device build runs no meta kernel (no torch._dynamo import)."""
    k = [scale * v for v in _KERNEL_1D]
    return torch.tensor([[a * b for b in k] for a in k])


class KDownsample2D(nn.Module):
    """Depthwise stride-2 blur: reflect-pad 1, then conv with k⊗k, k = [1,3,3,1]/8; side n → ⌊n/2⌋."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel.to(x.dtype).expand(x.shape[1], 1, 4, 4)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, stride=2, groups=x.shape[1])


class KUpsample2D(nn.Module):
    """Depthwise stride-2 transposed blur with (2k)⊗(2k): reflect-pad 1, padding 3; side n → 2n."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel.to(x.dtype).expand(x.shape[1], 1, 4, 4)
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv_transpose2d(x, weight, stride=2, padding=3, groups=x.shape[1])
