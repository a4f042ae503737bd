"""Pictures of tiling. A smooth gradient through TAESD (real weights), decoded whole, in blended tiles and in
abutting tiles (no overlap), with the step profile a seam would show up in; and a photo upscaled by the default model
with the U-Net whole and in blended tiles.

    python benchmarks/seams.py [--out docs/images/tiled_decode.png] [--unet-out docs/images/tiled_unet.png]

Decode picture rows: untiled | blended tiles (latentup) | abutting tiles | 20x |blended - untiled| |
20x |abutting - untiled|. U-Net picture: untiled | U-Net in 128-px tiles (32-px overlaps) | 10x |difference|.
Needs $LATENTUP_WEIGHTS/taesd (../shared/weights in this repository's sandbox).
"""

import argparse
from pathlib import Path

import torch
from PIL import Image

from latentup.autoencoders import TAESD
from latentup.imageio import to_pil, to_tensor
from latentup.tiling import tile_starts
from latentup.pipeline import Upscaler, default_weights

TILE, OVERLAP = 16, 8  # latent px: 128-px tiles sharing 64 px


def gradient(height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([x, y, (x + y) / 2])[None] * 0.8 + 0.1


def decode(taesd: TAESD, z: torch.Tensor, overlap: int | None) -> torch.Tensor:
    taesd.tile_size, taesd.tile_overlap = (None, None) if overlap is None else (TILE, overlap)
    return taesd.decode(z)


def seam_ratios(image: torch.Tensor, full: torch.Tensor, overlap: int, latent_size) -> list[float]:
    """Per axis (rows, columns): largest deviation of the mean step at a tile border from the median step, over
    the noise level (robust std) of the untiled decode's step profile."""
    ratios = []
    for axis, size in zip((-2, -1), latent_size):
        def steps(im, axis=axis):
            return im.diff(dim=axis).mean(dim=[d for d in range(4) if d != axis % 4])

        starts = tile_starts(size, TILE, overlap)
        borders = sorted({8 * s for s in starts[1:]} | {8 * (s + TILE) for s in starts[:-1]})
        profile, reference = steps(image), steps(full)
        noise = 1.4826 * (reference - reference.median()).abs().median()
        ratios.append(((profile[[b - 1 for b in borders]] - profile.median()).abs().max() / noise).item())
    return ratios


def stack(rows: list[torch.Tensor], axis: int = 2) -> torch.Tensor:
    pad = (0, 0, 0, 4) if axis == 2 else (0, 4)
    return torch.cat([torch.nn.functional.pad(r, pad, value=1.0) for r in rows], dim=axis)


def unet_picture(out: Path, photo: Path) -> None:
    """The default model on ``photo``, the U-Net whole and in 16-latent-px tiles; prints max |Δ| of the images."""
    upscaler = Upscaler.from_pretrained(default_weights(), autoencoder="taesd")
    whole = to_tensor(upscaler.upscale_image(photo, seed=0))
    upscaler = upscaler.with_options(unet_tile=16)
    tiled = to_tensor(upscaler.upscale_image(photo, seed=0))
    print(f"U-Net tiles of 16 latent px: max |tiled - whole| {(tiled - whole).abs().max():.3f}, "
          f"mean {(tiled - whole).abs().mean():.4f} (image scale 0..1)")
    to_pil(stack([whole, tiled, (10 * (tiled - whole).abs()).clamp(0, 1)], axis=3))[0].save(out, optimize=True)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images/tiled_decode.png"))
    parser.add_argument("--unet-out", type=Path, default=Path("docs/images/tiled_unet.png"))
    parser.add_argument("--photo", type=Path, default=Path("latentup/assets/example.png"))
    args = parser.parse_args()
    taesd = TAESD.from_weights_folder("sd").eval()
    with torch.no_grad():
        z = taesd.encode(gradient(256, 512))
        full, blended, abutting = decode(taesd, z, None), decode(taesd, z, OVERLAP), decode(taesd, z, 0)
    for name, image, overlap in (("blended", blended, OVERLAP), ("abutting", abutting, 0)):
        rows, columns = seam_ratios(image, full, overlap, z.shape[-2:])
        print(f"{name:9s} tiles: step at tile borders = {rows:.1f} (rows), {columns:.1f} (columns) x noise level; "
              f"max |tiled - untiled| {(image - full).abs().max():.3f}")
    rows = [full, blended, abutting, *((20 * (tiled - full).abs()).clamp(0, 1) for tiled in (blended, abutting))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(stack(rows))[0].save(args.out, optimize=True)
    print(f"wrote {args.out} ({Image.open(args.out).size[0]}x{Image.open(args.out).size[1]})")
    unet_picture(args.unet_out, args.photo)


if __name__ == "__main__":
    main()
