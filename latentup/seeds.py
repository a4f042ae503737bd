"""The two seed rules: sample i of a batch (image i of a folder or set) samples with ``seed + i``, and
reproducible streams key their generators with a well-mixed seed of several integers."""

import numpy as np


def image_seed(seed: int | None, index: int) -> int:
    """The seed of sample ``index`` of a batch, folder or set: ``seed + index`` (None: the default seed 0)."""
    return (seed or 0) + index


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> np.uint64(1))
