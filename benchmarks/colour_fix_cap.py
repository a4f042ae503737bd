"""What the colour fix leaves to a perfect model: oracle rows under the evaluation protocol, no model needed.

For a latent input the pipeline's colour fix takes the low band of decode(z), z = encode(LR):

    fixed(x) = clamp(x + G_sigma * (up(decode(z)) - x), 0, 1)

so even a model that returned encode(HR) exactly would score ``ceiling + fix``, not the ceiling; ``HR + fix`` is the
bound for any output at all. Rows, PSNR-Y (2-px border) and LPIPS-alex averaged over the set, same crops and LR as
``evaluate.py``: the ceiling decode(encode(HR)), pixel-bicubic-of-decoded-LR, and for each sigma the ceiling and HR
with the fix.

    python benchmarks/colour_fix_cap.py --set B100 --sigmas 0.5 1 2
"""

import argparse
import os
from pathlib import Path

import torch
from tqdm import tqdm

from latentup.autoencoders import load_autoencoder
from latentup.colour_fix import check_colour_fix, colour_fix
from latentup.errors import exit_on_error
from latentup.evaluation.metrics import build_lpips, psnr
from latentup.evaluation.protocol import bicubic2x, list_set_images, load_pair


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="B100", help="a folder under --data-root")
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")) / "eval")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0], help="colour fix sigmas (output px)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for sigma in args.sigmas:
        check_colour_fix(sigma)
    if args.threads:
        torch.set_num_threads(args.threads)
    autoencoder, lpips = load_autoencoder("taesd").eval(), build_lpips()  # only these two metrics: no SSIM
    paths = list_set_images(args.data_root / args.set)
    totals: dict[str, dict[str, float]] = {}
    for path in tqdm(paths, desc=args.set, unit="img"):
        hr, lr = (x[None] for x in load_pair(path))
        with torch.no_grad():
            decoded_lr = autoencoder.decode(autoencoder.encode(lr, sample=False))
            ceiling = autoencoder.decode(autoencoder.encode(hr, sample=False))
        rows = {"ceiling": ceiling, "pixel-bicubic-of-decoded-LR": bicubic2x(decoded_lr).clamp(0, 1)}
        for sigma in args.sigmas:
            rows[f"ceiling + fix {sigma:g}"] = colour_fix(ceiling, decoded_lr, sigma)
            rows[f"HR + fix {sigma:g}"] = colour_fix(hr, decoded_lr, sigma)
        for name, image in rows.items():
            total = totals.setdefault(name, {"psnr_y": 0.0, "lpips": 0.0})
            total["psnr_y"] += psnr(image.float(), hr, y=True).item() / len(paths)
            with torch.no_grad():
                total["lpips"] += lpips(image.float(), hr).item() / len(paths)
            lpips.reset()
    print(f"\n### {args.set}, {len(paths)} images (PSNR-Y with a 2-px border, LPIPS-alex)\n")
    print("| row | PSNR-Y | LPIPS |\n|---|---|---|")
    for name, total in totals.items():
        print(f"| {name} | {total['psnr_y']:.2f} | {total['lpips']:.4f} |")


if __name__ == "__main__":
    with exit_on_error():
        main()
