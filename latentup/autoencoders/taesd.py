"""TAESD: the tiny distilled autoencoders of SD1/2, SDXL, SD3 and FLUX.1 latents (madebyollin/taesd).

Layout (``nn.Sequential`` indices are the state-dict keys of the weight files):
- encoder: conv(3->64), Block, then 3x [conv stride 2 (no bias), 3 Blocks], conv(64->C)   (15 entries)
- decoder: tanh(z/3)*3, conv(C->64), ReLU, 3x [3 Blocks, nearest 2x, conv (no bias)], Block, conv(64->3)   (20)
- Block(x) = relu(conv(relu(conv(relu(conv(x))))) + x), 3x3 convs, 64 channels.

Latent convention: TAESD works directly in the diffusion model's latent space. Relative to the matching
full VAE's raw posterior sample z, TAESD latents are (z - shift) * scale: SD1/2 scale 0.18215, SDXL 0.13025,
SD3 (1.5305, shift 0.0609), FLUX.1 (0.3611, shift 0.1159). That is how ComfyUI feeds them
((z - vae_shift) * vae_scale), and why diffusers uses them with scaling_factor 1.0 and shift_factor 0.0
(the taef1 AutoencoderTiny config; the taesd3 model card sets shift_factor = 0). So ``encode`` returns the
encoder output as is and ``decode`` takes the latent as is (``scaling_factor`` 1, ``shift_factor`` 0): the
same latent space as ``AutoencoderKL.encode/decode`` of the matching full VAE.
Images are RGB in [0, 1] on both sides (diffusers' AutoencoderTiny maps [-1, 1] around the same networks).
"""

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from latentup.autoencoders.base import Autoencoder
from latentup.errors import ConfigError
from latentup.weights.files import read_state_dict
from latentup.weights.locate import find_file
from latentup.weights.strict import load_strict

VARIANTS = {"sd": ("taesd", 4), "sdxl": ("taesdxl", 4), "sd3": ("taesd3", 16), "flux": ("taef1", 16)}
WIDTH = 64


def conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x)."""

    def __init__(self, channels: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    """tanh(z / 3) * 3: keeps decoder inputs inside (-3, 3)."""

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(z / 3) * 3


def build_encoder(latent_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [conv(3, WIDTH), Block()]
    for _ in range(3):
        layers += [conv(WIDTH, WIDTH, stride=2, bias=False), Block(), Block(), Block()]
    return nn.Sequential(*layers, conv(WIDTH, latent_channels))


def build_decoder(latent_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [SoftClamp(), conv(latent_channels, WIDTH), nn.ReLU()]
    for _ in range(3):
        layers += [Block(), Block(), Block(), nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False)]
    return nn.Sequential(*layers, Block(), conv(WIDTH, 3))


def autoencoder_tiny_to_taesd(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderTiny keys -> TAESD keys: ``encoder.layers.N`` -> ``encoder.N``, ``decoder.layers.N``
    -> ``decoder.(N+1)`` (diffusers applies the decoder's soft clamp outside its Sequential)."""
    out = {}
    for key, value in state.items():
        if m := re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", key):
            key = f"{m[1]}.{int(m[2]) + (m[1] == 'decoder')}.{m[3]}"
        out[key] = value
    return out


def _file_name(variant: str) -> str:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown TAESD variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return VARIANTS[variant][0]


def _part(state: dict[str, Tensor], part: str) -> dict[str, Tensor]:
    """The encoder or decoder tensors of a per-part TAESD file or of a diffusers AutoencoderTiny file."""
    if not any(k.startswith(f"{part}.layers.") for k in state):
        return state
    prefix = f"{part}."
    return {k[len(prefix):]: v for k, v in autoencoder_tiny_to_taesd(state).items() if k.startswith(prefix)}


class TAESD(Autoencoder):
    """Tiny autoencoder; ``variant`` picks the latent space: "sd" (SD1/2), "sdxl", "sd3" or "flux"."""

    def __init__(self, variant: str = "sd"):
        super().__init__()
        _file_name(variant)
        self.variant = variant
        self.latent_channels = VARIANTS[variant][1]
        self.encoder = build_encoder(self.latent_channels)
        self.decoder = build_decoder(self.latent_channels)

    def _encode_raw(self, image01: Tensor) -> Tensor:
        return self.encoder(image01)

    def _decode_raw(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @classmethod
    def from_files(cls, encoder_path: str | Path, decoder_path: str | Path, variant: str = "sd") -> "TAESD":
        """Load per-part TAESD files (``.safetensors`` or ``.pth``) or an AutoencoderTiny file for both parts;
        weights are cast to float32."""
        model = cls(variant)
        for part, path in (("encoder", encoder_path), ("decoder", decoder_path)):
            state = _part(read_state_dict(path), part)
            load_strict(getattr(model, part), state, what=f"TAESD {variant} {part}")
        return model

    @classmethod
    def from_folder(cls, folder: str | Path, variant: str = "sd") -> "TAESD":
        """Load ``<name>_encoder.safetensors`` and ``<name>_decoder.safetensors`` from ``folder``
        (name: taesd, taesdxl, taesd3 or taef1 for variant sd, sdxl, sd3 or flux)."""
        folder, name = Path(folder).expanduser(), _file_name(variant)
        return cls.from_files(folder / f"{name}_encoder.safetensors", folder / f"{name}_decoder.safetensors", variant)

    @classmethod
    def from_weights_folder(cls, variant: str = "sd", download: bool = False) -> "TAESD":
        """Load from ``$LATENTUP_WEIGHTS/taesd/``, else the Hugging Face cache of ``madebyollin/<name>``
        (AutoencoderTiny layout, converted), else a download when ``download=True``."""
        name = _file_name(variant)
        paths = [
            find_file(f"taesd/{name}_{part}.safetensors", hub_repo=f"madebyollin/{name}",
                      hub_filename="diffusion_pytorch_model.safetensors", download=download)
            for part in ("encoder", "decoder")
        ]
        return cls.from_files(*paths, variant=variant)
