"""LightningDataModule: an endless, resumable training stream and a fixed validation set.

The training loader starts at micro-batch ``global_step × accumulate_grad_batches`` of :class:`GlobalBatchSampler`,
so ``ckpt_path=last`` resumes the data position exactly; each rank reads its own slice of every global batch
(``use_distributed_sampler`` must be False: the trainer configs set it).
"""

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from latentup.data.stream import EpochStream, GlobalBatchSampler


def collate(items: list[dict]) -> dict:
    """Stack tensors and numbers; keep strings (captions) as lists."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class PairDataModule(L.LightningDataModule):
    """``train`` / ``val``: datasets, or callables building them in ``setup`` (e.g. shards that may not exist yet)."""

    def __init__(self, train: Dataset | Callable[[], Dataset], val: Dataset | Callable[[], Dataset] | None = None,
                 batch_size: int = 8, val_batch_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, pin_memory: bool = True):
        super().__init__()
        self._train, self._val = train, val
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.seed, self.shuffle, self.pin_memory = seed, shuffle, pin_memory
        self.train: Dataset | None = None
        self.val: Dataset | None = None

    @staticmethod
    def _build(spec):
        return spec() if callable(spec) and not isinstance(spec, Dataset) else spec

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train is None:
            self.train = self._build(self._train)
        if self.val is None and self._val is not None:
            self.val = self._build(self._val)

    def empty_prompt(self) -> dict | None:
        """Precomputed embedding of "" (for caption dropout) when the training data carries text embeddings."""
        return getattr(self.train, "empty_prompt", lambda: None)()

    def _loader(self, dataset, **kw) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, **kw)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        sampler = GlobalBatchSampler(self.batch_size, rank, world, start)
        return self._loader(EpochStream(self.train, self.seed, self.shuffle), batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        return self._loader(self.val, batch_size=self.val_batch_size, shuffle=False)
