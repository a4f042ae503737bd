"""Worn photos restored, not copied (issue 27): the picture path on worn inputs, scored against the clean HR.

For each photo of a held-out set (B100, Set14: none is in the training images), HR = the protocol's crop, LR = PIL
bicubic x1/2, then each kind of wear (``configs/degradation/``: jpeg, grain_jpeg, pixelate, and clean) seeded per
photo; every output is scored against the CLEAN HR (PSNR-Y with a 2-px border, LPIPS-alex), beside pixel bicubic of
the same worn picture (the protocol's ``bicubic2x``). The goal: on worn inputs LPIPS <= 0.6x bicubic's and PSNR-Y
>= bicubic's + 0.5 dB; on clean ones LPIPS <= 0.5x bicubic's and PSNR-Y >= bicubic's - 0.5 dB.

``infer``: as a user runs it: the worn pictures written as PNG into ``<out>/<kind>/``, then ``python infer.py
input=<out>/<kind> output=<out>/<kind>_x2`` at its defaults (plus ``--set`` overrides), outputs read back.

``choices``: the consistency choices in one process (``Upscaler.upscale_pixels``; each ``--variant`` is a list of
settings such as ``restore=true,back_projection=10``), with ``bicubic(cleaned)``: pixel bicubic of the cleaned
picture, what the cleaner alone gives.

``wear``: the wear estimate's signatures (``latentup/wear.py``: JPEG-grid blockiness b, 2x2 block share p) and the
strength on every 8th BSDS500 training picture (LR), clean and worn: where the estimate's thresholds come from.

    python benchmarks/worn_check.py wear
    python benchmarks/worn_check.py infer --set B100 --limit 20 --out /tmp/worn
    python benchmarks/worn_check.py choices --set B100 --limit 20 --cleaner /work/runs/cleaner/cnn_64x8/at_3600s.safetensors \\
        --variant restore=false,back_projection=10 --variant restore=false,back_projection=0 \\
        --variant restore=true,back_projection=10 --variant restore=true,back_projection=0
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentup.data.crops import load_pair
from latentup.data.degradation import load_degradation
from latentup.data.sources import list_set_images
from latentup.errors import exit_on_error
from latentup.evaluation.metrics import ImageMetrics
from latentup.evaluation.protocol import bicubic2x
from latentup.imageio import to_tensor
from latentup.seeds import mix_seed

REPO = Path(__file__).resolve().parents[1]
KINDS = ("clean", "jpeg", "grain_jpeg", "pixelate")


def worn_pictures(folder: Path, limit: int, kinds=KINDS) -> tuple[list[str], list[torch.Tensor], dict]:
    """(names, clean HRs [3, H, W], {kind: worn LRs}) of the first ``limit`` images of ``folder``."""
    names, hrs, worn = [], [], {kind: [] for kind in kinds}
    for i, path in enumerate(list_set_images(folder)[:limit]):
        hr, lr = load_pair(path, 64)
        names.append(path.stem), hrs.append(hr)
        for kind in kinds:
            wear = load_degradation(None if kind == "clean" else kind)
            worn[kind].append(lr if wear is None else wear.tensor(lr, mix_seed(0, i)))
    return names, hrs, worn


def score(metrics: ImageMetrics, outputs: list[torch.Tensor], hrs: list[torch.Tensor]) -> tuple[float, float]:
    """Mean (PSNR-Y, LPIPS) of outputs against their HRs."""
    values = [metrics(out[None].float(), hr[None]) for out, hr in zip(outputs, hrs)]
    return (float(np.mean([v["psnr_y"].item() for v in values])), float(np.mean([v["lpips"].item() for v in values])))


def verdict(kind: str, psnr: float, lpips: float, bicubic: tuple[float, float]) -> str:
    ratio, gain = lpips / bicubic[1], psnr - bicubic[0]
    met = ratio <= 0.5 and gain >= -0.5 if kind == "clean" else ratio <= 0.6 and gain >= 0.5
    return f"{ratio:.2f}x, {gain:+.2f} dB: {'met' if met else 'not met'}"


def table(rows: dict, bicubic: dict) -> str:
    lines = ["| input | row | PSNR-Y | LPIPS | against bicubic (goal) |", "|---|---|---|---|---|"]
    for kind, by_row in rows.items():
        lines.append(f"| {kind} | pixel bicubic | {bicubic[kind][0]:.2f} | {bicubic[kind][1]:.4f} | |")
        for name, (psnr, lpips) in by_row.items():
            lines.append(f"| {kind} | {name} | {psnr:.2f} | {lpips:.4f} | "
                         f"{verdict(kind, psnr, lpips, bicubic[kind]) if 'bicubic' not in name else ''} |")
    return "\n".join(lines)


def run_infer(args, names, worn, hrs, metrics) -> dict:
    rows = {}
    for kind, pictures in worn.items():
        source, target = args.out / kind, args.out / f"{kind}_x2"
        source.mkdir(parents=True, exist_ok=True)
        for name, picture in zip(names, pictures):
            array = picture.mul(255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(array).save(source / f"{name}.png")
        command = [sys.executable, str(REPO / "infer.py"), f"input={source}", f"output={target}", "overwrite=true",
                   "progress=false", *args.overrides]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        outputs = [to_tensor(Image.open(target / f"{name}.png").convert("RGB"))[0] for name in names]
        rows[kind] = {"latentup (infer.py defaults" + (", " + " ".join(args.overrides) if args.overrides else "")
                      + ")": score(metrics, outputs, hrs)}
    return rows


def run_choices(args, names, worn, hrs, metrics) -> dict:
    from latentup.pipeline import Upscaler, default_weights
    from latentup.training.cleaner import bundle

    weights = args.weights or default_weights()
    if args.cleaner:
        weights = bundle(weights, args.cleaner, args.out / "with_cleaner.safetensors")
    upscaler = Upscaler.from_pretrained(weights)
    variants = [dict(item.split("=", 1) for item in v.split(",")) for v in args.variant]
    parse = {"true": True, "false": False}
    rows = {kind: {} for kind in worn}
    for kind, pictures in worn.items():
        if upscaler.cleaner is not None:
            with torch.no_grad():
                cleaned = [upscaler.cleaner(p[None])[0] for p in pictures]
            rows[kind]["bicubic(cleaned)"] = score(metrics, [bicubic2x(c[None])[0].clamp(0, 1) for c in cleaned], hrs)
        for variant in variants:
            settings = {k: parse.get(v, v) if not v.replace(".", "").isdigit() else float(v) if "." in v else int(v)
                        for k, v in variant.items()}
            outputs = [upscaler.upscale_pixels(p[None], seed=[i], **settings)[0] for i, p in enumerate(pictures)]
            rows[kind][",".join(f"{k}={v}" for k, v in variant.items())] = score(metrics, outputs, hrs)
            print(kind, variant, rows[kind], flush=True)
    return rows


def wear_table(args) -> None:
    from latentup.wear import block_share, blockiness, wear_strength

    files = sorted(p for p in (args.data / "train" / "BSDS500").rglob("*") if p.suffix in (".jpg", ".png"))[::8]
    print("| LR wear | b 5th / 50th / 95th pct | p 50th / 95th pct | strength mean | strength 0 |\n|---|---|---|---|---|")
    for kind in KINDS:
        wear = load_degradation(None if kind == "clean" else kind)
        rows = []
        for i, path in enumerate(files):
            lr = load_pair(path, 64)[1]
            x = (lr if wear is None else wear.tensor(lr, mix_seed(1, i)))[None]
            rows.append((blockiness(x).item(), block_share(x).item(), wear_strength(x).item()))
        b, p, s = np.array(rows).T
        print(f"| {kind} | {' / '.join(f'{v:.3f}' for v in np.percentile(b, [5, 50, 95]))} | "
              f"{' / '.join(f'{v:.3f}' for v in np.percentile(p, [50, 95]))} | {s.mean():.2f} | {np.mean(s == 0):.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("infer", "choices"):
        p = sub.add_parser(name)
        p.add_argument("--set", default="B100")
        p.add_argument("--limit", type=int, default=20)
        p.add_argument("--data", type=Path, default=Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")))
        p.add_argument("--out", type=Path, default=Path("outputs/worn_check"))
        p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
        p.add_argument("--threads", type=int, default=1)
    sub.choices["infer"].add_argument("overrides", nargs="*", help="infer.py key=value overrides")
    sub.choices["choices"].add_argument("--weights", type=Path, help="upscaler file (default: the bundled one)")
    sub.choices["choices"].add_argument("--cleaner", type=Path, help="a cleaner export to bundle with the weights")
    sub.choices["choices"].add_argument("--variant", action="append", required=True)
    w = sub.add_parser("wear")
    w.add_argument("--data", type=Path, default=Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")))
    args = parser.parse_args()
    if args.command == "wear":
        return wear_table(args)
    with exit_on_error():
        torch.set_num_threads(args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        names, hrs, worn = worn_pictures(args.data / "eval" / args.set, args.limit, args.kinds)
        metrics = ImageMetrics(border=2)
        bicubic = {kind: score(metrics, [bicubic2x(p[None])[0].clamp(0, 1) for p in worn[kind]], hrs) for kind in worn}
        rows = (run_infer if args.command == "infer" else run_choices)(args, names, worn, hrs, metrics)
        text = table(rows, bicubic)
        print(f"\n{args.set}[:{args.limit}], every row against the clean HR (PSNR-Y 2-px border, LPIPS-alex):\n{text}")
        (args.out / f"{args.command}_{args.set}_{args.limit}.json").write_text(json.dumps(
            {"bicubic": bicubic, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
