"""What the plain-PyTorch trainers (``one_step``, ``cleaner``) share: recipes read from YAML, a clock of compute
spent, and ``last.pt`` states that resume a run."""

import time
from pathlib import Path

import torch

from latentup.errors import ConfigError


class RecipeFile:
    """A dataclass mixin: ``from_file`` builds the recipe from a YAML file, refusing unknown keys."""

    @classmethod
    def from_file(cls, path: str | Path):
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{path}: unknown recipe keys {sorted(unknown)}; use {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


class Clock:
    """Seconds spent: the process's CPU time (``cpu``, all threads) or wall time (``wall``), plus an offset."""

    def __init__(self, kind: str, offset: float = 0.0):
        if kind not in ("cpu", "wall"):
            raise ConfigError(f"clock must be cpu or wall, got {kind!r}")
        self.read = time.process_time if kind == "cpu" else time.perf_counter
        self.offset, self.start = offset, self.read()

    def __call__(self) -> float:
        return self.offset + self.read() - self.start


def resume(last: Path, model, ema, optimizer, device) -> dict | None:
    """Load ``last`` (a state written by a trainer) into the model, its EMA and the optimizer; returns the state
    (its ``step``, ``seconds`` and the trainer's own entries), or None when there is none yet."""
    if not last.is_file():
        return None
    state = torch.load(last, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    return state
