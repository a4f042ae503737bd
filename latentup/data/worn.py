"""Pairs of (worn, clean) low-res pictures for training the cleaner, drawn on the fly.

For batch ``step`` (a pure function of (seed, step), so a resumed run draws what an uninterrupted one would):

    HR   = a random ``2 patch``-px crop of a training image, turned or mirrored by one of the 8 symmetries
    LR   = PIL bicubic x1/2 of HR (the protocol's LR: the clean target)
    worn = degradation(LR)   (``latentup.data.degradation``, seeded per sample)

The images are decoded once and held as uint8 (larger ones shrunk to ``max_side``).
"""

import numpy as np
import torch
from PIL import Image

from latentup.data.crops import DIHEDRAL, downscale_x2, limit_side, random_boxes
from latentup.data.degradation import Degradation
from latentup.data.sources import open_source
from latentup.errors import InputError
from latentup.seeds import mix_seed


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255


class WornPairs:
    def __init__(self, source: str, degradation: Degradation, patch: int = 96, batch_size: int = 16,
                 seed: int = 0, max_side: int | None = 1024):
        images = open_source(source)
        self.images = [image for image in (limit_side(images[i].image, max_side) for i in range(len(images)))
                       if min(image.size) >= 2 * patch]
        if not self.images:
            raise InputError(f"no image of {source} is at least {2 * patch} px on both sides: lower the patch")
        self.degradation, self.patch, self.batch_size, self.seed = degradation, patch, batch_size, seed

    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
        """(worn LR, clean LR) of one random crop."""
        image = self.images[int(rng.integers(len(self.images)))]
        [box] = random_boxes(image.width, image.height, 2 * self.patch, 1, rng)
        turn = DIHEDRAL[int(rng.integers(len(DIHEDRAL)))]
        hr = image.crop(box) if turn is None else image.crop(box).transpose(turn)
        clean = downscale_x2(hr)
        return self.degradation(clean, rng)[0], clean

    def batch(self, step: int) -> dict:
        """{"worn", "clean"}: [batch_size, 3, patch, patch] in [0, 1]."""
        pairs = [self.sample(np.random.default_rng(mix_seed(self.seed, step, k))) for k in range(self.batch_size)]
        return {"worn": _tensor([p[0] for p in pairs]), "clean": _tensor([p[1] for p in pairs])}

    def __call__(self, step: int):
        while True:
            yield self.batch(step)
            step += 1
