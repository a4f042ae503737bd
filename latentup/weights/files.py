"""Reading state dicts from disk: safetensors by default, pickle formats only with ``weights_only=True``."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from latentup.errors import WeightsMismatchError, WeightsNotFoundError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, or of a pickle checkpoint loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist: check the path")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix in PICKLE_SUFFIXES:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure becomes one line
        raise WeightsMismatchError(
            f"cannot read weights {path} ({type(error).__name__}): pass a complete safetensors file or a plain torch "
            "state dict (pickled objects and TorchScript archives are refused)"
        ) from None
    raise WeightsMismatchError(f"weights {path} have an unknown suffix: use .safetensors (or .bin/.pth/.ckpt)")


def find_in_folder(folder, stem: str = "diffusion_pytorch_model") -> Path:
    """The weights file of a diffusers component folder, safetensors preferred over the pickle ``.bin``."""
    folder = Path(folder)
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsNotFoundError(f"no {stem}.safetensors (or .bin) in {folder}: is this a complete diffusers folder?")
