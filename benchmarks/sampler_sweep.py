"""Quality against speed of sampler settings for one checkpoint: (sampler, steps[, colour fix]) → PSNR-Y, LPIPS,
s / image.

Every setting is a model row of one ``latentup.evaluation.run.evaluate`` call (same images, seeds, protocol and
baselines as ``evaluate.py``), so the rows differ only in the sampler; each row's sampling time is measured around
its own calls (LR encode excluded; decode and colour fix included).

    python benchmarks/sampler_sweep.py --checkpoint latentup/assets/latentup-x2-taesd.safetensors \\
        --settings euler:1 euler:4 euler:4:1 euler:8 dpmpp_2m:4 heun:4 euler_ancestral:20

Writes the evaluation outputs under ``--output-dir`` and prints a Markdown table per set.
"""

import argparse
import os
import time
from functools import partial
from pathlib import Path

import torch

from latentup.autoencoders import load_autoencoder
from latentup.errors import exit_on_error
from latentup.evaluation.metrics import ImageMetrics
from latentup.evaluation.run import evaluate
from latentup.pipeline import Upscaler
from latentup.settings import parse_setting


class Timed:
    """``fn`` that adds its wall time and the number of images it produced to running totals."""

    def __init__(self, fn):
        self.fn, self.seconds, self.images = fn, 0.0, 0

    def __call__(self, latent, **kwargs):
        start = time.perf_counter()
        out = self.fn(latent, **kwargs)
        self.seconds += time.perf_counter() - start
        self.images += latent.shape[0]
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--settings", nargs="+", required=True,
                        help="sampler:steps[:colour_fix] (omitted: the weights' default), e.g. euler:8 euler:4:1")
    parser.add_argument("--sets", nargs="+", default=["Set5", "Set14"])
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")) / "eval")
    parser.add_argument("--autoencoder", default="taesd")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads [torch's default]")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/sampler_sweep"))
    args = parser.parse_args()
    settings = {text: parse_setting(text) for text in args.settings}
    if args.threads:
        torch.set_num_threads(args.threads)
    autoencoder = load_autoencoder(args.autoencoder).to(args.device).eval()
    upscaler = Upscaler.from_pretrained(args.checkpoint, device=args.device, autoencoder=autoencoder)
    upscaler.upscale_latent(torch.zeros(1, 4, 8, 8, device=args.device), steps=1)  # warm-up (e.g. filter caches)
    rows = {text: Timed(partial(upscaler.upscale_latent_to_image, **given)) for text, given in settings.items()}
    summary = evaluate(autoencoder, {name: args.data_root / name for name in args.sets}, args.output_dir,
                       ImageMetrics(), rows, grids=0, batch_size=1, autoencoder_name=args.autoencoder,
                       settings={"checkpoint": args.checkpoint, "settings": args.settings})
    for name in args.sets:
        print(f"\n### {name}\n\n| setting | PSNR-Y (dB) | LPIPS | s / image |\n|---|---|---|---|")
        for row, timed in rows.items():
            values = summary[name]["rows"][row]
            seconds = f"{timed.seconds / timed.images:.2f}" if timed.images else "–"  # a resumed row was not timed
            print(f"| {row} | {values['psnr_y']:.2f} | {values['lpips']:.4f} | {seconds} |")


if __name__ == "__main__":
    with exit_on_error():
        main()
