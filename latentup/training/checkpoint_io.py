"""Atomic checkpoint files: write to a temporary file in the target folder, fsync, then rename over the target.

A run killed while saving leaves the previous ``last.ckpt`` intact, so ``ckpt_path=last`` always resumes.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from latentup.data.shards import umask


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600 files
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
