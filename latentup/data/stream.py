"""A resumable, split-invariant sample stream for step-based training.

Positions p = 0, 1, 2, ... index an endless stream over a dataset of N samples:

    epoch e = p // N,   index = perm_e[p mod N]  (perm_e = randperm(N) seeded by (seed, e)),  sample seed = mix(seed, p)

Micro-batch m of rank r (of W ranks, B samples each) holds positions m·B·W + r·B + j, j < B, so W ranks with batch
B see exactly the samples one process with batch B·W sees, and a run resumed at optimizer step k (with A
accumulated micro-batches per step) restarts at m = k·A: the data position needs no state beyond the step count.
"""

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from latentup.seeds import mix_seed


class EpochStream(Dataset):
    """Maps a stream position to ``dataset.sample(index, seed)`` plus its ``position``."""

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True):
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, position: int) -> int:
        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        if self._perm is None or self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(n, generator=generator))
        return int(self._perm[1][offset])

    def __getitem__(self, position: int) -> dict:
        item = self.dataset.sample(self.index(position), mix_seed(self.seed, position))
        return {**item, "position": position}


class GlobalBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of stream positions for one rank, from micro-batch ``start`` on."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} of {world_size}")
        self.batch_size, self.rank, self.world_size, self.start = batch_size, rank, world_size, start

    def __iter__(self) -> Iterator[list[int]]:
        step, b = self.start, self.batch_size
        while True:
            first = step * b * self.world_size + self.rank * b
            yield list(range(first, first + b))
            step += 1
