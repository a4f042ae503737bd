"""Learning-rate schedule of k-diffusion's trainer (SPEC §5.2).

InverseLR with exponential warm-up, for optimizer step t = 0, 1, ...:

    lr(t) = lr_0 · (1 - warmup^(t+1)) · (1 + t / inv_gamma)^(-power),   floored at ``min_lr``.

With warmup 0.99 the rate reaches 63 % of lr_0 after 100 steps and 99 % after 460; with inv_gamma 20000 and
power 1 it halves at t = 20000.
"""

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def inverse_lr_factor(step: int, inv_gamma: float = 20000.0, power: float = 1.0, warmup: float = 0.99) -> float:
    """lr(t) / lr_0 for optimizer step t."""
    return (1 - warmup ** (step + 1)) * (1 + step / inv_gamma) ** -power


class InverseLR(LRScheduler):
    """Stateless in the step count (``last_epoch``), so a resumed run gets exactly the same rates."""

    def __init__(self, optimizer: Optimizer, inv_gamma: float = 20000.0, power: float = 1.0, warmup: float = 0.99,
                 min_lr: float = 0.0, last_epoch: int = -1):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {warmup}")
        self.inv_gamma, self.power, self.warmup, self.min_lr = inv_gamma, power, warmup, min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = inverse_lr_factor(self.last_epoch, self.inv_gamma, self.power, self.warmup)
        return [max(self.min_lr, base * factor) for base in self.base_lrs]
