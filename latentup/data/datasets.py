"""Pixel datasets that the LightningModule encodes on the fly (small data, validation).

Each item holds ``hr_pixels`` [3, S, S] and ``lr_pixels`` [3, S/2, S/2] in [0, 1] and a ``caption``; the module
turns them into latents with its autoencoder. ``sample(index, seed)`` draws the random crop (and flip) from
``seed``, so that an epoch-shuffled stream of (index, seed) pairs is reproducible and resumable.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentup.data.crops import check_crop, limit_side, load_pair, pair, random_boxes
from latentup.data.sources import list_set_images, open_source
from latentup.errors import InputError


class ImageCropDataset(torch.utils.data.Dataset):
    """Random ``crop``-px HR crops (+ LR) of the images of a folder or tar shards; sources smaller than the crop
    (after ``max_side``) are left out."""

    def __init__(self, root: str | Path, crop: int = 256, align: int = 64, max_side: int | None = None,
                 flip: bool = True, captions: bool = True):
        self.source = open_source(root)
        self.crop, self.max_side, self.flip, self.captions = check_crop(crop, align), max_side, flip, captions
        self.indices = [i for i in range(len(self.source)) if self._fits(i)]
        if not self.indices:
            raise InputError(f"no image of {root} is at least {crop} px on both sides: lower data.crop")

    def _fits(self, i: int) -> bool:
        files = getattr(self.source, "files", None)
        if files is None:  # tar shards: decided when read
            return True
        with Image.open(files[i]) as image:
            w, h = image.size
        scale = 1.0 if self.max_side is None else min(1.0, self.max_side / max(w, h))
        return min(w, h) * scale >= self.crop

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, index: int, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        src = self.source[self.indices[index]]
        image = limit_side(src.image, self.max_side)
        boxes = random_boxes(image.width, image.height, self.crop, 1, rng)
        if not boxes:
            raise InputError(f"{src.key} is smaller than the {self.crop}-px crop: lower data.crop")
        hr, lr = pair(image, boxes[0])
        if self.flip and rng.random() < 0.5:
            hr, lr = hr.flip(-1), lr.flip(-1)
        return {"hr_pixels": hr, "lr_pixels": lr, "caption": src.caption if self.captions else ""}

    def __getitem__(self, index: int) -> dict:
        return self.sample(index, seed=index)


class ImageEvalDataset(torch.utils.data.Dataset):
    """The evaluation protocol's pairs (``latentup.data.crops.load_pair``): centre crop to multiples of ``align`` px,
    LR = PIL bicubic ×1/2. Images differ in size: batch them one at a time."""

    def __init__(self, root: str | Path, align: int = 64, limit: int | None = None):
        self.files = list_set_images(root)[:limit]
        self.align = align

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        hr, lr = load_pair(self.files[index], self.align)
        caption = self.files[index].with_suffix(".txt")
        return {"hr_pixels": hr, "lr_pixels": lr, "index": index,
                "caption": caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""}
