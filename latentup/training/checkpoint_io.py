"""Training checkpoints: read only with ``weights_only=True``, written atomically (temporary file in the target
folder, fsync, then rename over the target).

A run killed while saving leaves the previous ``last.ckpt`` intact, so ``ckpt_path=last`` always resumes.
"""

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from latentup.atomic import write_atomic
from latentup.errors import WeightsMismatchError


def load_training_checkpoint(path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint written by train.py, read with ``weights_only=True`` (``mmap``: tensors stay on disk, a cheap
    check); anything else is a one-line ``WeightsMismatchError``."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - any reader failure becomes one line
        raise WeightsMismatchError(_refusal(path, type(error).__name__)) from None
    if not isinstance(checkpoint, dict) or "latentup" not in checkpoint:
        raise WeightsMismatchError(_refusal(path, "no 'latentup' entry"))
    return checkpoint


def _refusal(path, why: str) -> str:
    return (f"{path} is not a latentup training checkpoint loadable with weights_only=True ({why}): use a checkpoint "
            "written by train.py (pickled objects are refused)")


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_training_checkpoint(path, map_location or "cpu")
