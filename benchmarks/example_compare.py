"""The README's picture: a latent upscaler's 2× of a picture beside what one gets without it.

Columns, each 2× the input: the input enlarged by nearest neighbour; latent interpolation (encode, bicubic ×2 of
the latent, decode: what SD front-ends do without a learned upscaler); pixel bicubic of the input; the model's 2×
latent decoded as it is (what an SD pipeline gets, here decoded by TAESD); the model as ``infer.py`` runs it on the
picture (the weights' recommended settings: with back-projection onto the picture). Top: the whole pictures;
bottom: the window of the bicubic enlargement with the most detail, enlarged by nearest neighbour.

With ``--wear KIND...`` (``configs/degradation/``: jpeg, grain_jpeg, pixelate) the picture is worn first (seeded)
and each kind gets a strip: the worn input, pixel bicubic, the model without its cleaner (back-projection onto the
worn picture: the damage comes back sharper) and the default (the cleaner first, back-projection onto the cleaned
picture).

    python benchmarks/example_compare.py --weights latentup/assets/latentup-x2-taesd.safetensors \\
        --out docs/images/example_compare.png
    python benchmarks/example_compare.py --image PHOTO --wear jpeg grain_jpeg pixelate --out docs/images/worn_compare.png
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from latentup.atomic import write_atomic
from latentup.data.degradation import load_degradation
from latentup.errors import exit_on_error
from latentup.evaluation.grids import GAP, LABEL_HEIGHT, OUTLINE, _font, to_image, zoom_window
from latentup.evaluation.protocol import bicubic2x
from latentup.imageio import to_tensor
from latentup.pipeline import Upscaler, default_weights


def strip(columns: dict[str, torch.Tensor], zoom_of: torch.Tensor, zoom_width: int) -> Image.Image:
    """Labelled full images side by side, with the window :func:`zoom_window` picks in ``zoom_of`` below."""
    top, left, side = zoom_window(zoom_of)
    width, height = zoom_of.shape[-1], zoom_of.shape[-2]
    column = max(width, zoom_width)
    canvas = Image.new("RGB", (len(columns) * (column + GAP) - GAP, LABEL_HEIGHT + height + GAP + column), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for i, (label, image) in enumerate(columns.items()):
        x = i * (column + GAP)
        full = to_image(image)
        canvas.paste(full, (x, LABEL_HEIGHT))
        draw.rectangle([x + left, LABEL_HEIGHT + top, x + left + side, LABEL_HEIGHT + top + side], outline=OUTLINE,
                       width=2)
        zoom = full.crop((left, top, left + side, top + side)).resize((column, column), Image.NEAREST)
        canvas.paste(zoom, (x, LABEL_HEIGHT + height + GAP))
        draw.multiline_text((x + 2, 2), label, fill="black", font=font, spacing=2)
    return canvas


def stack(strips: list[Image.Image]) -> Image.Image:
    """Strips one under the other."""
    canvas = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips) + GAP * (len(strips) - 1)),
                       "white")
    for i, strip_image in enumerate(strips):
        canvas.paste(strip_image, (0, sum(s.height + GAP for s in strips[:i])))
    return canvas


def worn_strips(upscaler: Upscaler, pixels: torch.Tensor, kinds: list[str]) -> Image.Image:
    """One strip per kind of wear: worn input, bicubic, without the cleaner, the default."""
    settings = upscaler.settings()
    strips = []
    for kind in kinds:
        worn = load_degradation(kind).tensor(pixels[0], seed=0)[None]
        columns = {
            f"{kind}: worn input,\nnearest x2": F.interpolate(worn, scale_factor=2, mode="nearest")[0],
            "pixel bicubic x2": bicubic2x(worn).clamp(0, 1)[0],
            f"latentup without the cleaner\n(back-projection {settings.back_projection} onto the worn picture)":
                upscaler.upscale_pixels(worn, restore=False)[0],
            f"latentup default (cleaner, then\nback-projection {settings.back_projection} onto its output)":
                upscaler.upscale_pixels(worn)[0],
        }
        strips.append(strip(columns, columns["pixel bicubic x2"], 0))
    return stack(strips)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="latentup weights (default: the bundled model)")
    parser.add_argument("--image", type=Path, default=Path("latentup/assets/example.png"))
    parser.add_argument("--out", type=Path, default=Path("docs/images/example_compare.png"))
    parser.add_argument("--wear", nargs="+", help="worn strips of these kinds (configs/degradation/) instead")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with exit_on_error():
        upscaler = Upscaler.from_pretrained(args.weights or default_weights(), dtype="float32")
        settings = upscaler.settings()
        picture = Image.open(args.image).convert("RGB")
        pixels = to_tensor(picture)
        if args.wear:
            grid = worn_strips(upscaler, pixels, args.wear)
            write_atomic(args.out, lambda tmp: grid.save(tmp, format="PNG"))
            print(f"wrote {args.out} ({grid.width}x{grid.height})")
            return
        latent = upscaler.autoencoder.encode(pixels, sample=False)
        ours = to_tensor(upscaler.upscale_image(picture))
        decoded = upscaler.autoencoder.decode(upscaler.upscale_latent(latent)).clamp(0, 1)
        fixes = (f", colour fix {settings.colour_fix:g}" * bool(settings.colour_fix)
                 + f",\nback-projection {settings.back_projection}" * bool(settings.back_projection))
        columns = {
            "input, nearest x2": F.interpolate(pixels, scale_factor=2, mode="nearest")[0],
            "latent interpolation\n(bicubic x2 of the latent)": upscaler.autoencoder.decode(bicubic2x(latent))[0],
            "pixel bicubic x2": bicubic2x(pixels).clamp(0, 1)[0],
            f"latentup, 2x latent\ndecoded as it is ({settings.sampler} {settings.steps})": decoded[0],
            f"latentup on the picture\n({settings.sampler} {settings.steps}{fixes})": ours[0],
        }
        grid = strip(columns, columns["pixel bicubic x2"], 0)
        write_atomic(args.out, lambda tmp: grid.save(tmp, format="PNG"))
        print(f"wrote {args.out} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
