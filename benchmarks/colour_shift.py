"""Colour shifts of the evaluation rows against the HR image, for one checkpoint at several sampler settings.

Per row: the mean offset of each RGB channel from HR (x255), and the chroma ratio mean_i c(row_i) / mean_i c(HR_i),
with c(x) = RMS over pixels of (R, G, B) minus their per-pixel mean: 1 keeps the saturation, below 1 is washed out,
above 1 oversaturated. Same images, crops, LR and seeds as ``evaluate.py`` (image i uses seed i). A setting
``sampler:steps:sigma`` sets the colour fix (``latentup.colour_fix``; ``:0`` = off, omitted = the weights' default).

    python benchmarks/colour_shift.py --checkpoint latentup/assets/latentup-x2-taesd.safetensors --set B100 \\
        --count 20 --settings euler:1 euler:4:0 euler:4:1 --grid colour_fix.png
"""

import argparse
import os
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from latentup.autoencoders import load_autoencoder
from latentup.errors import exit_on_error
from latentup.evaluation.grids import save_grid
from latentup.evaluation.protocol import list_set_images, load_pair, reconstruct
from latentup.pipeline import Upscaler
from latentup.settings import parse_setting


def chroma(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B]: RMS distance of each pixel's RGB from its grey value."""
    return (images - images.mean(1, keepdim=True)).pow(2).mean((1, 2, 3)).sqrt()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--set", default="B100", help="a folder under --data-root")
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")) / "eval")
    parser.add_argument("--count", type=int, default=20, help="first N images of the set (sorted by name)")
    parser.add_argument("--settings", nargs="+", default=["euler:4"],
                        help="sampler:steps[:colour_fix], e.g. euler:1 euler:4:0 euler:4:1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--grid", type=Path, help="also write a PNG grid of the first image (settings' rows, ceiling)")
    args = parser.parse_args()
    settings = {text: parse_setting(text) for text in args.settings}
    if args.threads:
        torch.set_num_threads(args.threads)
    autoencoder = load_autoencoder("taesd")
    upscaler = Upscaler.from_pretrained(args.checkpoint, autoencoder=autoencoder)
    paths = list_set_images(args.data_root / args.set)[: args.count]
    offsets, chromas = {}, {}
    for seed, path in enumerate(tqdm(paths, desc=args.set, unit="img")):
        hr, lr = load_pair(path)
        models = {text: partial(upscaler.upscale_latent_to_image, seed=seed, **given)
                  for text, given in settings.items()}
        rows = {**reconstruct(autoencoder, hr[None], lr[None], models), "HR": hr[None]}
        if args.grid and seed == 0:
            save_grid(args.grid, lr, {name: rows[name][0] for name in [*settings, "ceiling"]}, hr)
        for name, image in rows.items():
            offsets[name] = offsets.get(name, 0) + (image - hr).mean((0, 2, 3)) * 255 / len(paths)
            chromas[name] = chromas.get(name, 0) + chroma(image).item() / len(paths)
    print(f"\n### {args.set}, first {len(paths)} images\n")
    print("| row | mean offset R, G, B (x255) | chroma ratio |\n|---|---|---|")
    for name in offsets:
        r, g, b = offsets[name].tolist()
        print(f"| {name} | {r:+.2f}, {g:+.2f}, {b:+.2f} | {chromas[name] / chromas['HR']:.3f} |")


if __name__ == "__main__":
    with exit_on_error():
        main()
