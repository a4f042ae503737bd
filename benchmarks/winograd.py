"""One 3×3 convolution, oneDNN direct against latentup's Winograd F(4×4, 3×3), on the released U-Net's shapes.

    python benchmarks/winograd.py --threads 1

Prints a Markdown table: seconds (best of ``--repeats``, the two alternating), speed-up and the relative error.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from latentup.nn.winograd import transform_filter, winograd_conv3x3

SHAPES = [(384, 128), (384, 64), (384, 32), (768, 32), (768, 16)]  # (channels, side) at 512->1024 px, CFG batch 2


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| conv (channels, side) | direct s | Winograd s | speed-up | max rel. error |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for channels, side in SHAPES:
        x = torch.randn(args.batch, channels, side, side, generator=g)
        w, b = torch.randn(channels, channels, 3, 3, generator=g) * 0.02, torch.randn(channels, generator=g)
        filt = transform_filter(w)
        direct = F.conv2d(x, w, b, padding=1)
        error = ((winograd_conv3x3(x, filt, b) - direct).abs().max() / direct.abs().max()).item()
        t_direct = best(lambda: F.conv2d(x, w, b, padding=1), args.repeats)
        t_fast = best(lambda: winograd_conv3x3(x, filt, b), args.repeats)
        print(f"| {channels}, {side}×{side} | {t_direct:.3f} | {t_fast:.3f} | {t_direct / t_fast:.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
