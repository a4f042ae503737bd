"""Picture of a tiled decode: a smooth gradient through TAESD (real weights), decoded whole, in blended tiles,
and in abutting tiles (no overlap), with the column-step profile a seam would show up in.

    python benchmarks/seams.py [--out docs/images/tiled_decode.png]

Rows of the picture: untiled decode | blended tiles (latentup) | abutting tiles | 20x |blended - untiled| |
20x |abutting - untiled|. Needs $LATENTUP_WEIGHTS/taesd (../shared/weights in this repository's sandbox).
"""

import argparse
from pathlib import Path

import torch
from PIL import Image

from latentup.autoencoders import TAESD
from latentup.imageio import to_pil
from latentup.nn.tiling import tile_starts

TILE, OVERLAP = 16, 8  # latent px: 128-px tiles sharing 64 px


def gradient(height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([x, y, (x + y) / 2])[None] * 0.8 + 0.1


def decode(taesd: TAESD, z: torch.Tensor, overlap: int | None) -> torch.Tensor:
    taesd.tile_size, taesd.tile_overlap = (None, None) if overlap is None else (TILE, overlap)
    return taesd.decode(z)


def seam_stats(image: torch.Tensor, full: torch.Tensor, overlap: int, width: int) -> tuple[float, float]:
    """(largest column-step deviation at a tile border, robust noise level of the untiled profile)."""
    def steps(im):
        return (im[..., 1:] - im[..., :-1]).mean(dim=(0, 1, 2))

    starts = tile_starts(width, TILE, overlap)
    borders = sorted({8 * s for s in starts[1:]} | {8 * (s + TILE) for s in starts[:-1]})
    profile, reference = steps(image), steps(full)
    noise = 1.4826 * (reference - reference.median()).abs().median()
    return (profile[[b - 1 for b in borders]] - profile.median()).abs().max().item(), noise.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images/tiled_decode.png"))
    args = parser.parse_args()
    taesd = TAESD.from_weights_folder("sd").eval()
    with torch.no_grad():
        z = taesd.encode(gradient(256, 512))
        full, blended, abutting = decode(taesd, z, None), decode(taesd, z, OVERLAP), decode(taesd, z, 0)
    for name, image, overlap in (("blended", blended, OVERLAP), ("abutting", abutting, 0)):
        step, noise = seam_stats(image, full, overlap, z.shape[-1])
        print(f"{name:9s} tiles: border column step {step:.2e} = {step / noise:.1f} x noise level {noise:.2e}; "
              f"max |tiled - untiled| {(image - full).abs().max():.3f}")
    rows = [full, blended, abutting, *((20 * (tiled - full).abs()).clamp(0, 1) for tiled in (blended, abutting))]
    picture = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, 4), value=1.0) for r in rows], dim=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(picture)[0].save(args.out, optimize=True)
    print(f"wrote {args.out} ({Image.open(args.out).size[0]}x{Image.open(args.out).size[1]})")


if __name__ == "__main__":
    main()
