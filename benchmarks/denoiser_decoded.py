"""Latent error against image error of the denoiser's one-call estimate x̂0 = D(z_hr + σε; σ | LR).

Why ``model.decoder_loss`` exists: the denoising loss makes x̂0 the latent posterior mean, and a small latent error
need not decode to a good image (TAESD's decoder is nonlinear). For held-out images (centre crops of ``--crop``
px, LR = PIL bicubic ×½ as in the evaluation protocol) this prints, per σ and per weights file, the latent MSE of
x̂0 to z_hr and the RGB PSNR of decode(x̂0) against the HR crop, next to the baselines' numbers (their latent: the
encoding of their image).

    python benchmarks/denoiser_decoded.py --weights before.safetensors after.safetensors \\
        --images $LATENTUP_DATA/eval/Set14 --count 8

``--fit-steps N`` adds the best decodable image: z* = argmin_z ‖dec(z) − HR‖² by N Adam steps from z_hr. It is
far closer to HR than the ceiling dec(z_hr), the reason for ``decoder_loss.reference=pixels``.
"""

import argparse
import os
from pathlib import Path

import torch
from PIL import Image

from latentup.autoencoders import load_autoencoder
from latentup.diffusion.conditioning import low_res_conditioning
from latentup.evaluation.metrics import psnr
from latentup.evaluation.protocol import bicubic2x, list_set_images, open_rgb
from latentup.imageio import to_tensor
from latentup.pipeline import Upscaler


def crops(folder: Path, count: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR [N, 3, side, side], LR [N, 3, side/2, side/2]) centre crops of the first ``count`` images."""
    hrs, lrs = [], []
    for path in list_set_images(folder)[:count]:
        image = open_rgb(path)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        hr = image.crop((left, top, left + side, top + side))
        hrs.append(to_tensor(hr))
        lrs.append(to_tensor(hr.resize((side // 2, side // 2), Image.BICUBIC)))
    return torch.cat(hrs), torch.cat(lrs)


def fit_latent(autoencoder, z: torch.Tensor, hr: torch.Tensor, steps: int, lr: float = 0.02) -> torch.Tensor:
    """argmin_z ‖dec(z) − hr‖² by ``steps`` Adam steps from ``z``."""
    z = z.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = (autoencoder.decode(z) - hr).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    return z.detach()


def row(name: str, latent: torch.Tensor, image: torch.Tensor, z_hr: torch.Tensor, hr: torch.Tensor) -> str:
    mse = float((latent - z_hr).pow(2).mean())
    return f"| {name} | {mse:.4f} | {float(psnr(image, hr, border=0).mean()):.2f} |"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", required=True, help="latentup .safetensors files (TAESD space)")
    parser.add_argument("--images", type=Path,
                        default=Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")) / "eval" / "Set14")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[14.6, 3.0, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-steps", type=int, default=0, help="add the best decodable image (0: no)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    autoencoder = load_autoencoder("taesd").eval()
    hr, lr = crops(args.images, args.count, args.crop)
    z_hr, z_lr = autoencoder.encode(hr, sample=False), autoencoder.encode(lr, sample=False)
    print(f"{len(hr)} centre crops of {args.crop} px from {args.images}; latent variance {float(z_hr.var()):.4f}\n")
    print("| estimate | latent MSE | PSNR RGB (dB) |\n|---|---|---|")
    ceiling = autoencoder.decode(z_hr)
    print(row("ceiling decode(z_hr)", z_hr, ceiling, z_hr, hr))
    if args.fit_steps:
        best = fit_latent(autoencoder.requires_grad_(False), z_hr, hr, args.fit_steps)
        print(row(f"best decodable: argmin ‖dec(z) − HR‖², {args.fit_steps} Adam steps", best,
                  autoencoder.decode(best), z_hr, hr))
    pixel = bicubic2x(autoencoder.decode(z_lr)).clamp(0, 1)
    print(row("pixel-bicubic-of-decoded-LR", autoencoder.encode(pixel, sample=False), pixel, z_hr, hr))
    print(row("latent-bicubic", bicubic2x(z_lr), autoencoder.decode(bicubic2x(z_lr)), z_hr, hr))
    for weights in args.weights:
        upscaler = Upscaler.from_pretrained(weights, autoencoder=autoencoder, dtype="float32")
        image_cond, noise_embed = low_res_conditioning(z_lr, torch.zeros(len(hr)), upscaler.noise_fourier)
        generator = torch.Generator().manual_seed(args.seed)
        for sigma in args.sigmas:
            noised = z_hr + sigma * torch.randn(z_hr.shape, generator=generator)
            sigmas = torch.full((len(hr),), sigma)
            x0 = upscaler.denoiser(noised, sigmas, image_cond=image_cond, mapping_cond=noise_embed)
            print(row(f"{weights}: x̂0 at σ = {sigma:g}", x0, autoencoder.decode(x0), z_hr, hr))


if __name__ == "__main__":
    main()
