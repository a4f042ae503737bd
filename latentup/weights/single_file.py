"""latentup's portable single-file format: one safetensors file holding an upscaler and its config.

Tensors: ``unet.<diffusers key>`` (the U-Net, usually EMA weights), when the model was trained with noise
augmentation ``noise_fourier.weight`` [n, 1] (the fixed low-res noise-level Fourier weights), and optionally
``cleaner.<key>`` (``latentup.nn.cleaner``: restores worn pictures before they are upscaled; its config is
``meta["cleaner"]``).
Metadata (strings): ``format`` = ``latentup.upscaler/1``, ``unet_config`` (UNetConfig fields as JSON), ``meta``
(JSON: autoencoder, text encoder, training summary, recommended sampler settings, cleaner config).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentup.atomic import write_atomic
from latentup.errors import WeightsMismatchError

FORMAT = "latentup.upscaler/1"


@dataclass
class UpscalerFile:
    unet_config: dict
    unet_state: dict[str, torch.Tensor]
    noise_fourier: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    cleaner_state: dict[str, torch.Tensor] | None = None


def save_upscaler(path, unet_state, unet_config: dict, noise_fourier=None, meta: dict | None = None, dtype=None,
                  cleaner_state: dict | None = None) -> Path:
    """Write the file atomically (temp file + rename); ``dtype`` optionally casts floating tensors (e.g. fp16);
    ``cleaner_state`` (with its config in ``meta["cleaner"]``) adds a cleaner."""
    if (cleaner_state is None) != ("cleaner" not in (meta or {})):
        raise ValueError("a cleaner needs both its tensors and meta['cleaner'] (its config)")
    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu().contiguous()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    tensors = {f"unet.{k}": cast(v) for k, v in unet_state.items()}
    tensors.update({f"cleaner.{k}": cast(v) for k, v in (cleaner_state or {}).items()})
    if noise_fourier is not None:
        tensors["noise_fourier.weight"] = noise_fourier.detach().cpu().float().contiguous()
    metadata = {"format": FORMAT, "unet_config": json.dumps(unet_config), "meta": json.dumps(meta or {})}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def is_upscaler_file(path) -> bool:
    """True for a safetensors file written by :func:`save_upscaler`."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        return False


def load_upscaler(path) -> UpscalerFile:
    """Read a latentup single file (tensors on CPU, stored dtype)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise WeightsMismatchError(
                f"{path} is not a latentup upscaler file (metadata format={metadata.get('format')!r}); "
                "pass a diffusers folder, a k-diffusion checkpoint or a file written by latentup"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        config, meta = json.loads(metadata["unet_config"]), json.loads(metadata.get("meta", "{}"))
    except (KeyError, json.JSONDecodeError) as error:
        raise WeightsMismatchError(f"{path} has unreadable latentup metadata ({type(error).__name__}: {error}); "
                                   "export the weights again (train.py stage=export)") from None
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise WeightsMismatchError(f"{path}: latentup metadata unet_config and meta must be JSON objects; "
                                   "export the weights again (train.py stage=export)")
    unet = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    cleaner = {k[len("cleaner."):]: v for k, v in tensors.items() if k.startswith("cleaner.")}
    if bool(cleaner) != isinstance(meta.get("cleaner"), dict):
        raise WeightsMismatchError(f"{path}: cleaner tensors and the cleaner config (meta['cleaner']) must come "
                                   "together; export the weights again")
    return UpscalerFile(config, unet, tensors.get("noise_fourier.weight"), meta, cleaner or None)
