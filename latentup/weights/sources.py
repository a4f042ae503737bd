"""Resolve a weights argument (folder or file, any supported layout) into the parts of an upscaler.

Supported: a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``), a bare diffusers ``unet/`` folder, latentup's single safetensors file, and the original
k-diffusion checkpoint (``.pth``/``.ckpt``/``.safetensors``; SPEC §4.7).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentup.errors import LatentupError, WeightsMismatchError, WeightsNotFoundError
from latentup.nn.unet import UNet, UNetConfig
from latentup.weights.files import find_in_folder, read_state_dict
from latentup.weights.single_file import is_upscaler_file, load_upscaler
from latentup.weights.strict import expected_shapes, mismatch_report

STRUCTURE = ("in_channels", "out_channels", "channels", "depths")  # what the tensors alone determine


@dataclass
class UpscalerParts:
    unet_config: UNetConfig
    unet_state: dict[str, torch.Tensor]
    noise_fourier: torch.Tensor | None = None
    autoencoder: str | None = None  # a load_autoencoder spec: "taesd", or a diffusers vae/ folder
    text_encoder: Path | None = None  # a HF CLIPTextModel folder
    tokenizer: Path | None = None  # a HF tokenizer folder
    meta: dict = field(default_factory=dict)
    cleaner_state: dict[str, torch.Tensor] | None = None  # a cleaner for worn pictures (config: meta["cleaner"])


def checked_config(make_config, state: dict, source) -> UNetConfig:
    """The UNetConfig that ``make_config()`` builds from a file's metadata, checked against the file's tensors
    before any real allocation (a tampered config must not allocate 65536-channel layers): unusable values or a
    structure the tensors do not have are one-line WeightsMismatchErrors."""
    from latentup.weights.kdiffusion import config_from_state_dict

    fix = "the file's config is damaged: export or download the weights again"
    try:
        config = make_config()
    except (LatentupError, TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsMismatchError(f"{source}: unusable U-Net config ({reason}); {fix}") from None
    try:
        implied = config_from_state_dict(state)
    except WeightsMismatchError:
        raise WeightsMismatchError(f"{source}: the tensors do not fit any U-Net (layers are missing); the file is "
                                   "incomplete: export or download the weights again") from None
    differs = [f"{k} {getattr(config, k)} != {getattr(implied, k)}" for k in STRUCTURE
               if getattr(config, k) != getattr(implied, k)]
    if differs:
        raise WeightsMismatchError(f"{source}: the U-Net config does not match the tensors ({'; '.join(differs)}); {fix}")
    try:
        expected = expected_shapes(lambda: UNet(config))
    except (RuntimeError, ValueError, TypeError, ArithmeticError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsMismatchError(f"{source}: unusable U-Net config ({reason}); {fix}") from None
    report = mismatch_report(expected, state)
    if report:
        raise WeightsMismatchError(f"{source}: the U-Net config does not match the tensors ({report}); {fix}")
    return config


def _unet_folder(folder: Path) -> tuple[UNetConfig, dict]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"{config_path} is missing: a diffusers unet/ folder needs config.json")
    try:
        fields = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsMismatchError(f"{config_path} is not readable JSON ({type(error).__name__}): "
                                   "download or export the weights again") from None
    state = read_state_dict(find_in_folder(folder))
    return checked_config(lambda: UNetConfig.from_diffusers(fields), state, config_path), state


def _diffusers_pipeline(root: Path) -> UpscalerParts:
    config, state = _unet_folder(root / "unet")
    text = root / "text_encoder"
    return UpscalerParts(
        config,
        state,
        autoencoder=str(root / "vae") if (root / "vae").is_dir() else None,
        text_encoder=text if text.is_dir() else None,
        tokenizer=root / "tokenizer" if (root / "tokenizer").is_dir() else None,
        meta={"source": "diffusers", "path": str(root)},
    )


def resolve_weights(weights) -> UpscalerParts:
    """Read the U-Net (and pointers to the other components) from any supported weights location."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"weights {path} do not exist: pass a diffusers folder, a .safetensors or a .pth file")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _diffusers_pipeline(path)
        if (path / "unet").is_dir():
            return _diffusers_pipeline(path)
        if (path / "config.json").is_file():
            config, state = _unet_folder(path)
            return UpscalerParts(config, state, meta={"source": "diffusers-unet", "path": str(path)})
        raise WeightsNotFoundError(f"{path} is neither a diffusers pipeline folder (model_index.json) nor a unet/ folder")
    if is_upscaler_file(path):
        file = load_upscaler(path)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in file.unet_config.items()}
        return UpscalerParts(
            checked_config(lambda: UNetConfig(**fields), file.unet_state, path),
            file.unet_state,
            file.noise_fourier,
            autoencoder=file.meta.get("autoencoder"),
            meta=file.meta,
            cleaner_state=file.cleaner_state,
        )
    from latentup.weights.kdiffusion import load_kdiffusion_checkpoint

    config, state, fourier = load_kdiffusion_checkpoint(path)
    return UpscalerParts(config, state, fourier, meta={"source": "k-diffusion", "path": str(path)})
