"""Export the EMA weights of a training checkpoint for inference.

- latentup's single file (``save_upscaler``): U-Net + config + the low-res noise Fourier weights + metadata
  (autoencoder, text encoder, recommended sampler settings, training summary); runs with ``infer.py weights=FILE``.
- a diffusers ``unet/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
  ``UNet2DConditionModel.from_pretrained`` loads. diffusers has no K-block U-Net without cross-attention, so
  text-free models export to the single file only.
"""

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentup.atomic import write_atomic, write_text_atomic
from latentup.errors import ConfigError, WeightsNotFoundError
from latentup.nn.unet import UNetConfig
from latentup.training.checkpoint_io import load_training_checkpoint
from latentup.settings import SETTING_NAMES, Settings, check_int
from latentup.training.module import as_unet_config
from latentup.weights.single_file import save_upscaler

EMA_PREFIX, RAW_PREFIX = "model_ema.unet.", "model.unet."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_checkpoint(path: str | Path, ema: bool = True) -> tuple[UNetConfig, dict, torch.Tensor, dict]:
    """(U-Net config, U-Net state (EMA or raw), noise Fourier weights, meta) of a Lightning ``.ckpt``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint {path} does not exist: pass ckpt_path=PATH (or last)")
    checkpoint = load_training_checkpoint(path)
    prefix = EMA_PREFIX if ema else RAW_PREFIX
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    info = checkpoint["latentup"]
    meta = dict(info.get("meta", {}))
    meta["training"] = {**meta.get("training", {}), "steps": int(checkpoint.get("global_step", 0)),
                        "weights": "ema" if ema else "raw"}
    return as_unet_config(info["unet_config"]), state, checkpoint["state_dict"]["noise_fourier"], meta


def export_single_file(path: str | Path, config: UNetConfig, state: dict, noise_fourier: torch.Tensor | None,
                       meta: dict, dtype: torch.dtype | None = None) -> Path:
    """latentup's single safetensors file (atomic write)."""
    return save_upscaler(path, state, asdict(config), noise_fourier=noise_fourier, meta=meta, dtype=dtype)


def export_diffusers_unet(folder: str | Path, config: UNetConfig, state: dict,
                          dtype: torch.dtype | None = None) -> Path:
    """``folder/config.json`` + ``folder/diffusion_pytorch_model.safetensors`` (diffusers key names)."""
    diffusers_config = config.to_diffusers()  # raises for configs diffusers cannot build
    folder = Path(folder)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in state.items()}
    write_atomic(folder / DIFFUSERS_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(folder / "config.json", json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n")
    return folder


def check_recommended(recommended) -> None:
    """One-line errors for sampler settings that ``latentup.settings.Settings`` would not accept."""
    if not isinstance(recommended, Mapping):
        raise ConfigError(f"export.recommended must be a mapping such as {{sampler: dpmpp_2m, steps: 4}}, "
                          f"got {recommended!r}")
    unknown = sorted(set(recommended) - set(SETTING_NAMES))
    if unknown:
        raise ConfigError(f"export.recommended has unknown keys {unknown}: use fields of latentup.settings.Settings "
                          "(steps, sampler, schedule, cfg_scale, noise_level, ...)")
    check_int("export.recommended.steps", recommended.get("steps", 1), 1)
    Settings(**recommended).validate()


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, *, ema: bool = True, name: str = "model",
                      diffusers: bool | None = None, dtype: torch.dtype | None = None,
                      recommended: dict | None = None) -> dict[str, Path]:
    """Write ``out_dir/<name>.safetensors`` and (when possible, or when ``diffusers`` is True) ``out_dir/unet/``.

    ``diffusers=None`` exports the folder only for configs diffusers can build. ``recommended``: sampler settings
    (``latentup.settings.Settings`` fields, e.g. tuned by ``benchmarks/sampler_sweep.py``) that replace the
    training run's default recommendation in the file's metadata.
    """
    if recommended is not None:
        check_recommended(recommended)
    config, state, fourier, meta = read_checkpoint(ckpt_path, ema)
    if recommended is not None:
        meta["recommended"] = dict(recommended)
    out_dir = Path(out_dir)
    written = {"single_file": export_single_file(out_dir / f"{name}.safetensors", config, state, fourier, meta, dtype)}
    if diffusers or (diffusers is None and config._diffusers_problem() is None):
        written["diffusers"] = export_diffusers_unet(out_dir / "unet", config, state, dtype)
    return written
