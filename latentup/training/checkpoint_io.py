"""Atomic checkpoint files: write to a temporary file in the target folder, fsync, then rename over the target.

A run killed while saving leaves the previous ``last.ckpt`` intact, so ``ckpt_path=last`` always resumes.
"""

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from latentup.atomic import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))
