"""Devices by name, checked: one line for a name torch does not know or a GPU that is not there."""

import torch

from latentup.errors import ConfigError


def resolve_device(device, key: str = "device") -> torch.device:
    """A torch device from a name (cpu, cuda, cuda:N; ``auto`` or None: the GPU when CUDA has one, else the CPU);
    a ConfigError naming the config ``key`` for an unknown name or a GPU that is not there."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={device!r} is not a torch device: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={device} is not supported: use cpu, cuda, cuda:N or auto")
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        found = f"only {count} CUDA GPU(s) are" if count else "no CUDA GPU is"
        raise ConfigError(f"{key}={device} but {found} available: use {key}=cpu or {key}=auto")
    return device
