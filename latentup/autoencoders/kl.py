"""Stable Diffusion's KL-f8 VAE (diffusers ``AutoencoderKL`` key layout), written from scratch.

Encoder: conv_in -> per level [ResNet x layers_per_block, stride-2 conv except last] -> mid
[ResNet, self-attention, ResNet] -> GroupNorm, SiLU, conv_out (2C channels: mean || logvar) -> quant_conv.
Decoder mirrors it with layers_per_block + 1 ResNets and nearest 2x upsampling + conv per level.
Posterior: logvar clamped to [-30, 20], std = exp(logvar / 2). Images map to [-1, 1] inside (x -> 2x - 1).
"""

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentup.autoencoders.base import Autoencoder
from latentup.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError
from latentup.weights.files import find_in_folder, read_state_dict
from latentup.weights.strict import build_strict

EPS = 1e-6


@dataclass
class KLConfig:
    """The fields of a diffusers ``vae/config.json`` that shape the network (defaults: SD1/2 kl-f8)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: dict) -> "KLConfig":
        """Read a diffusers config dict; refuse block types and activations this VAE does not build."""
        blocks = set(config.get("down_block_types", ["DownEncoderBlock2D"])) | set(
            config.get("up_block_types", ["UpDecoderBlock2D"])
        )
        if blocks - {"DownEncoderBlock2D", "UpDecoderBlock2D"} or config.get("act_fn", "silu") != "silu":
            raise ConfigError(f"unsupported VAE config (blocks {sorted(blocks)}, act_fn {config.get('act_fn')}); "
                              "only SD-style KL VAEs (DownEncoderBlock2D/UpDecoderBlock2D, silu) are supported")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)

    def to_diffusers(self) -> dict:
        """A config dict that diffusers' ``AutoencoderKL.from_config`` accepts."""
        n = len(self.block_out_channels)
        return {**asdict(self), "block_out_channels": list(self.block_out_channels), "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 conv on x when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """Single-head attention over the H*W positions of GroupNorm(x), added back to x (SDPA, scale 1/sqrt(C))."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResNets followed by an optional resampler (keys ``resnets.i`` and ``downsamplers/upsamplers.0``)."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        if resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for name in ("downsamplers", "upsamplers"):
            for resample in getattr(self, name, ()):
                x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        ch, groups, last = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, None if i == last else "down")
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, None if i == len(ch) - 1 else "up")
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(Autoencoder):
    """SD KL-f8 VAE; state-dict keys equal diffusers' ``AutoencoderKL`` keys for the same config."""

    def __init__(self, config: KLConfig | None = None):
        super().__init__()
        self.config = cfg = config or KLConfig()
        self.latent_channels = cfg.latent_channels
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor or 0.0
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    def _encode_raw(self, image01: Tensor) -> Tensor:
        moments = self.encoder(2 * image01 - 1)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _posterior(self, moments: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def _decode_raw(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return (self.decoder(z) + 1) / 2

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "AutoencoderKL":
        """A randomly initialised VAE built from a diffusers ``vae/config.json`` dict."""
        return cls(KLConfig.from_diffusers(config))

    @classmethod
    def from_diffusers(cls, folder_or_config: str | Path | dict, weights: str | Path | dict | None = None):
        """Load a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.*), or a config dict/file.

        ``weights`` (a file or a state dict) overrides the folder's weights file; a bare config with no
        ``weights`` gives a randomly initialised VAE. Weights are not copied: the VAE is built uninitialised and
        holds the given tensors (those of a state dict too, converted only where the dtype differs).
        """
        source = folder_or_config
        if isinstance(source, dict):
            config = source
        else:
            source = Path(source).expanduser()
            config_file = source / "config.json" if source.is_dir() else source
            if not config_file.is_file():
                raise WeightsNotFoundError(f"VAE config {config_file} not found; pass a diffusers vae/ folder")
            config = json.loads(config_file.read_text())
            if weights is None and source.is_dir():
                weights = find_in_folder(source)
        if weights is None:
            return cls.from_diffusers_config(config)
        state = weights if isinstance(weights, dict) else read_state_dict(weights)
        return build_strict(lambda: cls.from_diffusers_config(config), state, what="VAE")

    @classmethod
    def from_single_file(cls, path: str | Path, **config) -> "AutoencoderKL":
        """Load one ``.safetensors/.ckpt/.pth`` file: a VAE (ldm or diffusers keys) or a full SD checkpoint.

        Widths, depth, latent channels and quant convs are read from the tensor shapes; ``config`` sets
        the rest (e.g. ``scaling_factor=0.13025`` for the SDXL VAE; default 0.18215).
        """
        state = read_state_dict(path)
        state = state.get("state_dict", state)  # Lightning/A1111 .ckpt wrapper
        state = ldm_to_diffusers(state) if any(".down.0." in k or ".mid.block_1." in k for k in state) else state
        config = KLConfig(**{**shapes_from_state_dict(state), **config})
        return build_strict(lambda: cls(config), state, what="VAE")


def shapes_from_state_dict(state: dict[str, Tensor]) -> dict:
    """Shape-determined KLConfig fields of a diffusers-layout VAE state dict."""
    if "decoder.conv_in.weight" not in state:
        raise WeightsMismatchError(
            f"not a VAE state dict (keys {sorted(state)[:3]}...); pass a KL VAE or a full SD checkpoint"
        )
    levels = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    first_level = r"encoder\.down_blocks\.0\.resnets\.\d+\.conv1\.weight"
    return {
        "block_out_channels": tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels),
        "layers_per_block": sum(bool(re.fullmatch(first_level, k)) for k in state),
        "latent_channels": state["decoder.conv_in.weight"].shape[1],
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
    }


_LDM_RULES = [  # (ldm pattern, diffusers replacement); decoder up-level indices are reversed afterwards
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]
_VAE_KEY = re.compile(r"^(encoder|decoder|quant_conv|post_quant_conv)\.")


def ldm_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CompVis/ldm/A1111 VAE keys -> diffusers keys (a full SD checkpoint: its ``first_stage_model.`` part).

    ``encoder.down.i.block.j`` -> ``encoder.down_blocks.i.resnets.j``; ``decoder.up.i`` -> ``up_blocks.(n-1-i)``;
    ``mid.block_1/2`` -> ``mid_block.resnets.0/1``; ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convs) ->
    ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (linear); ``nin_shortcut`` -> ``conv_shortcut``;
    ``norm_out`` -> ``conv_norm_out``. Non-VAE entries (loss, EMA counters) are dropped.
    """
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {k: v for k, v in state.items() if _VAE_KEY.match(k)}
    n_up = 1 + max((int(m[1]) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in state.items():
        for pattern, replacement in _LDM_RULES:
            key = re.sub(pattern, replacement, key)
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", key):
            key = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.{m[2]}"
        if ".attentions.0.to_" in key and key.endswith("weight") and value.ndim > 2:
            value = value.flatten(1)
        out[key] = value
    return out
