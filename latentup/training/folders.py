"""Where a Lightning run writes what it logs."""

from pathlib import Path


def log_dir(trainer) -> Path:
    """The first logger's folder, else the run folder (no collective call: safe on one rank only)."""
    folder = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    return Path(folder or trainer.default_root_dir)
