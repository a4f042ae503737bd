"""Batch streams for ``latentup.training.one_step.train``: ``stream(step)`` yields batches {hr, lr, hr_pixels} from
optimizer step ``step`` on, so that a resumed run continues where it stopped.

- ``shard_stream``: prepared latent-pair shards with their HR crops (``data.prepare.settings.pixels=true``), read
  in the seeded epoch order of ``latentup.data.stream.EpochStream`` (the CPU path: encoding is paid once).
- ``ImageCrops``: random crops of images held on the device, each turned or mirrored by one of the 8 symmetries
  of the square, LR = antialiased bicubic ×½ rounded to uint8 (PIL's filter, a = −0.5), both encoded on the fly
  or once into a pool of crops (the GPU path: no shards to carry).
"""

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from latentup.data.stream import EpochStream, mix_seed
from latentup.errors import InputError


def shard_stream(root: str | Path, batch_size: int, seed: int = 0, device: str = "cpu", limit: int | None = None):
    """``stream(step)`` over the shards in ``root`` (which must hold ``hr_pixels``), or over their first ``limit``
    pairs (then the shards need not be complete: a fixed pool while a preparation goes on)."""
    from torch.utils.data import Subset

    from latentup.data.shards import LatentShardDataset

    dataset = LatentShardDataset(root, require_complete=limit is None)
    if limit is not None:
        if limit > len(dataset):
            raise InputError(f"{root} holds {len(dataset)} pairs, fewer than the {limit} asked for: prepare more "
                             "or pass a smaller --pairs")
        dataset = Subset(dataset, range(limit))
    if "hr_pixels" not in dataset[0]:
        raise InputError(f"{root} holds no HR pixels: prepare it with data.prepare.settings.pixels=true")
    order = EpochStream(dataset, seed=seed)  # its seeded epoch permutations

    def stream(step: int) -> Iterator[dict]:
        position = step * batch_size
        while True:
            items = [dataset[order.index(p)] for p in range(position, position + batch_size)]
            position += batch_size
            yield {k: torch.stack([item[k] for item in items]).to(device) for k in ("hr", "lr", "hr_pixels")}

    return stream


def half_size(pixels: Tensor) -> Tensor:
    """uint8 images ×½ by antialiased bicubic (PIL's a = −0.5 filter), rounded back to uint8."""
    small = F.interpolate(pixels.float(), scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
    return small.round().clamp(0, 255).to(torch.uint8)


class ImageCrops:
    """Random ``crop``-px crops of ``images`` (uint8 [3, H, W] tensors; those smaller than ``crop`` are dropped),
    kept on the device in one zero-padded stack and cut for a whole batch by one gather: sample i takes image
    m_i at a uniform offset inside its own size, under symmetry s_i of the square (bit 2: transpose, bits 0 / 1:
    flip rows / columns; the 8 combinations are the 8 symmetries)."""

    def __init__(self, images: list[Tensor], encode, batch_size: int, crop: int = 256, seed: int = 0,
                 device: str = "cpu"):
        images = [image for image in images if min(image.shape[-2:]) >= crop]
        if not images:
            raise InputError(f"no training image is at least {crop} px on both sides")
        height, width = (max(image.shape[d] for image in images) for d in (1, 2))
        self.stack = torch.zeros(len(images), 3, height, width, dtype=torch.uint8, device=device)
        for i, image in enumerate(images):
            self.stack[i, :, :image.shape[1], :image.shape[2]] = image
        self.sizes = torch.tensor([image.shape[1:] for image in images], device=device)
        self.encode, self.batch_size, self.crop, self.seed, self.device = encode, batch_size, crop, seed, device
        self.pool: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, encode, batch_size: int, crop: int = 256, seed: int = 0,
                    device: str = "cpu", max_side: int | None = None) -> "ImageCrops":
        """Every image under ``folder`` (recursive), larger ones shrunk to ``max_side`` first, portrait ones
        transposed (a symmetry the crops draw anyway; the padded stack stays small)."""
        from PIL import Image

        images = []
        for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"}):
            image = Image.open(path).convert("RGB")
            if max_side and max(image.size) > max_side:
                scale = max_side / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
            images.append((pixels.transpose(0, 1) if image.height > image.width else pixels).permute(2, 0, 1).contiguous())
        return cls(images, encode, batch_size, crop, seed, device)

    def draw(self, generator: torch.Generator, n: int) -> Tensor:
        """n crops' (image, top, left, symmetry) [n, 4] on the device."""
        which = torch.randint(len(self.stack), (n,), generator=generator).to(self.device)
        offsets = torch.rand(n, 2, generator=generator).to(self.device)
        symmetry = torch.randint(8, (n,), generator=generator).to(self.device)
        top, left = (offsets * (self.sizes[which] - self.crop + 1)).long().unbind(1)
        return torch.stack([which, top, left, symmetry], dim=1)

    def cut(self, crops: Tensor) -> Tensor:
        """The uint8 pixels [n, 3, crop, crop] of ``crops`` (rows of :meth:`draw`), by one gather."""
        which, top, left, symmetry = (c.view(-1, 1, 1) for c in crops.unbind(1))
        grid = torch.arange(self.crop, device=self.device)
        n = len(crops)
        rows, cols = grid.view(1, -1, 1).expand(n, -1, self.crop), grid.view(1, 1, -1).expand(n, self.crop, -1)
        transpose = symmetry & 4 != 0
        rows, cols = torch.where(transpose, cols, rows), torch.where(transpose, rows, cols)
        rows = torch.where(symmetry & 1 != 0, self.crop - 1 - rows, rows) + top
        cols = torch.where(symmetry & 2 != 0, self.crop - 1 - cols, cols) + left
        return self.stack[which, :, rows, cols].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def latents(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(HR latent, LR latent) of uint8 crops."""
        return self.encode(pixels.float() / 255).float(), self.encode(half_size(pixels).float() / 255).float()

    @torch.no_grad()
    def fill_pool(self, count: int) -> None:
        """Encode ``count`` crops once (fp16 latents + crop rows); batches then draw from them and re-cut only
        their pixels: the encoder (38 GFLOP per 256-px crop and its LR, 62 % of a step's arithmetic) runs once."""
        crops, hr, lr = [], [], []
        for start in range(0, count, self.batch_size):
            generator = torch.Generator().manual_seed(mix_seed(self.seed, 1 << 40, start))
            rows = self.draw(generator, min(self.batch_size, count - start))
            z_hr, z_lr = self.latents(self.cut(rows))
            crops.append(rows), hr.append(z_hr.half()), lr.append(z_lr.half())
        self.pool = (torch.cat(crops), torch.cat(hr), torch.cat(lr))

    def batch(self, step: int) -> dict:
        """Batch ``step``: a pure function of (seed, step) and the pool."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, step))
        if self.pool is None:
            pixels = self.cut(self.draw(generator, self.batch_size))
            hr, lr = self.latents(pixels)
            return {"hr": hr, "lr": lr, "hr_pixels": pixels}
        crops, hr, lr = self.pool
        index = torch.randint(len(crops), (self.batch_size,), generator=generator).to(self.device)
        return {"hr": hr[index].float(), "lr": lr[index].float(), "hr_pixels": self.cut(crops[index])}

    def __call__(self, step: int) -> Iterator[dict]:
        while True:
            yield self.batch(step)
            step += 1
