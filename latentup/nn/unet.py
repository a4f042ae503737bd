"""The K-block U-Net of the x2 latent upscaler (k-diffusion ``image_v1``; SPEC §2), with diffusers' key names.

    emb  = TimeEmbedding(Fourier(c_noise) + cond_proj(mapping_cond))
    h    = conv_in(x)                                           1×1, in → channels[0]
    down level i:  depths[i] × (ResBlock → KAttentionBlock?),  skip_i = h,  KDownsample2D (not at the deepest)
    up level i (deepest first):  cat[h, skip_i] (not at the deepest),  depths[i] × (ResBlock → KAttentionBlock?),
                   the last ResBlock maps to channels[i-1],  KUpsample2D (not at level 0)
    out  = conv_out(h)                                          1×1, channels[0] → out

No mid block, no output norm. Sides must be multiples of 2^(levels-1) and at least 2^levels.

Everything the conditioning inputs contribute without x or the noise level (cond_proj(mapping_cond), the padding
bias, each cross-attention's keys/values of the text) is a ``Conditioning``; a sampler builds it once per call with
``UNet.condition`` and passes it to every step.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentup.errors import ConfigError, InputError
from latentup.nn.layers import (MASK_BIAS, FourierFeatures, KAttentionBlock, KDownsample2D, KUpsample2D, ResBlock,
                                TimeEmbedding, group_count)

# diffusers config keys that every K-block U-Net has: key -> (required value, diffusers' default when absent).
_DIFFUSERS_FIXED = {
    "act_fn": ("gelu", "silu"), "time_embedding_type": ("fourier", "positional"), "flip_sin_to_cos": (True, True),
    "timestep_post_act": ("gelu", None), "time_embedding_act_fn": (None, None), "conv_in_kernel": (1, 3),
    "conv_out_kernel": (1, 3), "mid_block_type": (None, "UNetMidBlock2DCrossAttn"), "norm_num_groups": (None, 32),
    "norm_eps": (1e-5, 1e-5), "center_input_sample": (False, False), "class_embed_type": (None, None),
    "num_class_embeds": (None, None), "addition_embed_type": (None, None), "encoder_hid_dim": (None, None),
}
# Unused by K blocks, written so that an exported config reads like the released one.
_DIFFUSERS_INERT = {"downsample_padding": 1, "dual_cross_attention": False, "freq_shift": 0,
                    "mid_block_scale_factor": 1, "only_cross_attention": False,
                    "resnet_time_scale_shift": "scale_shift", "sample_size": None,
                    "upcast_attention": False, "use_linear_projection": False}


@dataclass
class UNetConfig:
    in_channels: int = 8
    out_channels: int = 5
    channels: tuple[int, ...] = (384, 384, 768, 768)
    depths: tuple[int, ...] = (4, 4, 4, 4)
    self_attn: tuple[bool, ...] = (False, False, False, True)
    cross_attn: tuple[bool, ...] = (False, True, True, True)
    cross_attention_dim: int | None = 768  # None: no cross-attention anywhere (cross_attn becomes all False)
    head_dim: int = 64  # heads = max(1, C // head_dim)
    mapping_dim: int = 768  # time embedding width = 2 × Fourier frequencies
    mapping_cond_dim: int = 896  # 128 noise-level Fourier + 768 pooled text; 0 = no cond_proj

    def __post_init__(self):
        for name in ("channels", "depths", "self_attn", "cross_attn"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.cross_attention_dim is None:
            self.cross_attn = (False,) * len(self.channels)
        problem = self._problem()
        if problem:
            raise ConfigError(f"invalid U-Net config: {problem}; fix the model config")

    def heads(self, dim: int) -> int:
        return max(1, dim // self.head_dim)

    def _problem(self) -> str | None:
        c = self.channels
        if not c or {len(self.depths), len(self.self_attn), len(self.cross_attn)} != {len(c)}:
            return "channels, depths, self_attn and cross_attn need one entry per level"
        if min(self.depths) < 1 or self.mapping_dim % 2:
            return "depths must be >= 1 and mapping_dim even"
        if any(n % group_count(n) for ch in c for n in (ch, 2 * ch)):
            return f"channels {c} do not split into GroupNorm groups of ~32"
        attended = [i for i in range(len(c)) if self.self_attn[i] or self.cross_attn[i]]
        attn_dims = {d for i in attended for d in (c[i], c[max(i - 1, 0)])}
        if any(d % self.heads(d) for d in attn_dims):
            return f"attention widths {sorted(attn_dims)} are not multiples of head_dim {self.head_dim}"
        return None

    def _diffusers_problem(self) -> str | None:
        """Why diffusers' K blocks would build a different network for this config, or None."""
        c, n, m = self.channels, len(self.channels), self.mapping_dim
        if not self.cross_attn[-1]:
            return "the deepest level needs cross-attention (diffusers has no cross-free K-block U-Net)"
        if self.self_attn != tuple(i == n - 1 for i in range(n)):
            return "self-attention must be at the deepest level only"
        if min(c) < 32:
            return "every level needs at least 32 channels"
        if not c[-1] == c[max(n - 2, 0)] == m:
            return "the two deepest levels need channels equal to mapping_dim"
        for i in range(n - 1):
            if self.cross_attn[i] and c[i] == c[max(i - 1, 0)] == m:
                return f"level {i} would be mistaken for the deepest one (its channels equal mapping_dim)"
            if not self.cross_attn[i] and i and c[i] != c[i - 1]:
                return f"attention-free level {i} must have as many channels as level {i - 1}"
        if any(d % self.head_dim for i in range(n) if self.cross_attn[i] for d in (c[i], c[max(i - 1, 0)])):
            return f"attention widths must be multiples of head_dim {self.head_dim}"
        return None

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNetConfig":
        """Read a diffusers ``UNet2DConditionModel`` config.json made of K blocks."""
        for key, (value, default) in _DIFFUSERS_FIXED.items():
            if config.get(key, default) != value:
                raise ConfigError(f"diffusers U-Net config has {key}={config.get(key, default)!r}, a K-block U-Net "
                                  f"needs {value!r}; pass the config of a latent upscaler U-Net")
        down, up = list(config["down_block_types"]), list(config["up_block_types"])
        cross = [t == "KCrossAttnDownBlock2D" for t in down]
        expected_up = ["KCrossAttnUpBlock2D" if x else "KUpBlock2D" for x in reversed(cross)]
        if not set(down) <= {"KDownBlock2D", "KCrossAttnDownBlock2D"} or up != expected_up:
            raise ConfigError(f"diffusers block types {down} / {up} are not matching K blocks; "
                              "pass the config of a latent upscaler U-Net")
        channels = tuple(config["block_out_channels"])
        depths = config.get("layers_per_block", 2)
        head_dim = config.get("attention_head_dim", 8)
        if not isinstance(head_dim, int) or not isinstance(config.get("cross_attention_dim", 1280), (int, type(None))):
            raise ConfigError("per-block attention_head_dim / cross_attention_dim lists are not supported; "
                              "use one value")
        cfg = cls(
            in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4), channels=channels,
            depths=(depths,) * len(channels) if isinstance(depths, int) else tuple(depths),
            self_attn=tuple(x and i == len(channels) - 1 for i, x in enumerate(cross)), cross_attn=tuple(cross),
            cross_attention_dim=config.get("cross_attention_dim", 1280) if any(cross) else None, head_dim=head_dim,
            mapping_dim=config.get("time_embedding_dim") or 2 * channels[0],
            mapping_cond_dim=config.get("time_cond_proj_dim") or 0,
        )
        problem = cfg._diffusers_problem()
        if problem:
            raise ConfigError(f"diffusers U-Net config builds a network latentup cannot reproduce: {problem}")
        return cfg

    def to_diffusers(self) -> dict:
        """A config.json that ``UNet2DConditionModel.from_config`` turns into the same network (same keys)."""
        problem = self._diffusers_problem()
        if problem:
            raise ConfigError(f"this U-Net has no diffusers equivalent: {problem}; "
                              "save it in latentup's format instead")
        config = {key: value for key, (value, _) in _DIFFUSERS_FIXED.items()} | _DIFFUSERS_INERT | {
            "_class_name": "UNet2DConditionModel", "in_channels": self.in_channels, "out_channels": self.out_channels,
            "block_out_channels": list(self.channels), "attention_head_dim": self.head_dim,
            "layers_per_block": self.depths[0] if len(set(self.depths)) == 1 else list(self.depths),
            "down_block_types": ["KCrossAttnDownBlock2D" if x else "KDownBlock2D" for x in self.cross_attn],
            "up_block_types": ["KCrossAttnUpBlock2D" if x else "KUpBlock2D" for x in reversed(self.cross_attn)],
            "cross_attention_dim": self.cross_attention_dim, "time_cond_proj_dim": self.mapping_cond_dim or None,
        }
        if self.mapping_dim != 2 * self.channels[0]:
            config["time_embedding_dim"] = self.mapping_dim
        return dict(sorted(config.items()))


@dataclass
class Conditioning:
    """Per-call constants of the U-Net: m = cond_proj(mapping_cond) [B, E], context [B, T, D], the padding bias
    [B, 1, 1, T], and (when precomputed) the cross-attention (k, v) of each attention block, per level."""

    mapping: torch.Tensor | None = None
    context: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    kv: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = field(default_factory=list)


class Level(nn.Module):
    """One resolution level: ResBlock (c_in, c_mid, c_out) per layer, each followed by its attention block if any."""

    def __init__(self, cfg: UNetConfig, level: int, shapes: list[tuple[int, int, int]], resample: nn.Module):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(*shape, cfg.mapping_dim) for shape in shapes)
        self_attn, context_dim = cfg.self_attn[level], cfg.cross_attention_dim if cfg.cross_attn[level] else None
        self.attentions = nn.ModuleList(
            KAttentionBlock(c_out, cfg.heads(c_out), cfg.mapping_dim, self_attn, context_dim) for _, _, c_out in shapes
        ) if self_attn or context_dim else None
        self.resample = resample

    def context_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Cross-attention keys/values of ``context`` for each attention block (None without cross-attention)."""
        if self.attentions is None or self.attentions[0].attn2 is None:
            return None
        return [block.attn2.kv(context) for block in self.attentions]

    def forward(self, x, emb, context, context_bias, kv=None, use_checkpoint: bool = False) -> torch.Tensor:
        def run(module, *args):
            return checkpoint(module, *args, use_reentrant=False) if use_checkpoint else module(*args)

        for j, resnet in enumerate(self.resnets):
            x = run(resnet, x, emb)
            if self.attentions is not None:
                x = run(self.attentions[j], x, emb, context, context_bias, None if kv is None else kv[j])
        return x


class UNet(nn.Module):
    """F_θ(x, c_noise, mapping_cond, context): the network the Karras preconditioning wraps (SPEC §2)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False  # recompute each ResBlock / attention block in the backward pass
        c, n = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, c[0], 1)
        self.time_proj = FourierFeatures(cfg.mapping_dim // 2)
        self.time_embedding = TimeEmbedding(cfg.mapping_dim, cfg.mapping_cond_dim)

        def layers(c_first: int, c_last: int, i: int) -> list[tuple[int, int, int]]:
            d = cfg.depths[i]
            return [(c_first if j == 0 else c[i], c[i], c_last if j == d - 1 else c[i]) for j in range(d)]

        self.down_blocks = nn.ModuleList(
            Level(cfg, i, layers(c[max(i - 1, 0)], c[i], i), KDownsample2D() if i < n - 1 else nn.Identity())
            for i in range(n)
        )
        self.up_blocks = nn.ModuleList(  # deepest first; inputs are [h ‖ skip] except at the deepest level
            Level(cfg, i, layers(c[i] * (1 if i == n - 1 else 2), c[max(i - 1, 0)], i),
                  KUpsample2D() if i else nn.Identity())
            for i in reversed(range(n))
        )
        self.conv_out = nn.Conv2d(c[0], cfg.out_channels, 1)
        self._init_like_kdiffusion()

    def _init_like_kdiffusion(self):
        """k-diffusion v0.0.12 init: orthogonal mapping Linears and 1×1 skips, zero output projection."""
        for module in self.modules():
            if isinstance(module, ResBlock) and module.conv_shortcut is not None:
                nn.init.orthogonal_(module.conv_shortcut.weight)
        nn.init.orthogonal_(self.time_embedding.linear_1.weight)
        nn.init.orthogonal_(self.time_embedding.linear_2.weight)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def condition(self, mapping_cond=None, context=None, context_mask=None, precompute_kv: bool = True) -> Conditioning:
        """The per-call constants for these conditioning inputs (see ``forward``).

        ``precompute_kv=False`` leaves the cross-attention keys/values to each block's own forward (training, where
        FSDP gathers a block's weights only inside its forward).
        """
        cross = self.config.cross_attention_dim is not None and any(self.config.cross_attn)
        if cross and context is None:
            raise InputError("this U-Net has cross-attention: pass context [B, T, D] (text hidden states)")
        bias = None
        if cross and context_mask is not None:
            bias = torch.where(context_mask.to(context.device, torch.bool), 0.0, MASK_BIAS)[:, None, None, :]
        levels = (*self.down_blocks, *self.up_blocks)
        kv = [level.context_kv(context) for level in levels] if cross and precompute_kv else []
        return Conditioning(self.time_embedding.project(mapping_cond), context if cross else None, bias, kv)

    def forward(self, x, c_noise, mapping_cond=None, context=None, context_mask=None,
                conditioning: Conditioning | None = None) -> torch.Tensor:
        """x [B, in, H, W]; c_noise [] or [B] = ln(σ)/4; mapping_cond [B, mapping_cond_dim]; context [B, T, D];
        context_mask [B, T] bool, True = keep (padding gets a -10000 logit bias). Returns [B, out, H, W].
        mapping_cond / context are ignored by a U-Net without cond_proj / cross-attention. ``conditioning``
        (from ``condition``) replaces mapping_cond / context / context_mask."""
        n, (b, _, height, width) = len(self.config.channels), x.shape
        if height % 2 ** (n - 1) or width % 2 ** (n - 1) or min(height, width) < 2**n:
            raise InputError(f"U-Net input sides must be multiples of {2 ** (n - 1)} and at least {2**n}, "
                             f"got {height}×{width}; crop or pad the latent")
        if conditioning is None:
            conditioning = self.condition(mapping_cond, context, context_mask, precompute_kv=False)
        cond = conditioning
        c_noise = torch.as_tensor(c_noise, dtype=torch.float32, device=x.device).expand(b)
        emb = self.time_embedding(self.time_proj(c_noise).to(x.dtype), cond.mapping)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        kv = cond.kv or [None] * (2 * n)

        h, skips = self.conv_in(x), []
        for block, block_kv in zip(self.down_blocks, kv[:n]):
            h = block(h, emb, cond.context, cond.bias, block_kv, ckpt)
            skips.append(h)
            h = block.resample(h)
        for k, (block, block_kv) in enumerate(zip(self.up_blocks, kv[n:])):
            if k:
                h = torch.cat([h, skips[-1 - k]], dim=1)
            h = block.resample(block(h, emb, cond.context, cond.bias, block_kv, ckpt))
        return self.conv_out(h)
