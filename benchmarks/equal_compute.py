"""Train one-step recipes to equal compute budgets and tabulate them (issue 18).

``train`` runs a recipe (``configs/one_step/*.yaml``, ``latentup.training.one_step``) until the clock reaches
``--upto`` of its ``--hours`` marks (process CPU time on a CPU, wall time on a GPU), exporting the EMA weights at
every mark to ``<run>/at_<seconds>s.safetensors`` (one-step sampling recommended in their metadata); run it again
with a larger ``--upto`` and it resumes from ``<run>/last.pt``. Data: prepared shards with HR pixels (``--shards``,
the CPU path) or an image folder encoded on the fly (``--images``, the GPU path).

``table`` scores every export of the given runs with ``evaluate.py`` (model rows at their recommended settings,
colour fix off) on the first ``--limit`` images of a set, and prints recipe × budget → PSNR-Y / LPIPS.

    python benchmarks/equal_compute.py train --recipe configs/one_step/small_curriculum.yaml \\
        --run /work/runs/one_step/small_curriculum --shards /work/runs/pairs/taesd-256px-x8-dihedral-pixels \\
        --hours 0.25 0.5 1 2 --upto 0.5 --threads 1
    python benchmarks/equal_compute.py table --runs /work/runs/one_step/* --set B100 --limit 20 --threads 1
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from latentup.errors import ConfigError, exit_on_error

REPO = Path(__file__).resolve().parents[1]


def train(args) -> None:
    from latentup.autoencoders import load_autoencoder
    from latentup.evaluation.metrics import build_lpips
    from latentup.training.one_step import Curriculum, Recipe
    from latentup.training.one_step import train as run_training
    from latentup.training.one_step_data import ImageCrops, shard_stream

    recipe = Recipe.from_file(args.recipe)
    if args.batch_size:
        recipe.batch_size = args.batch_size
    if args.init:
        recipe.init_weights = str(args.init)
    if (args.shards is None) == (args.images is None):
        raise ConfigError("pass exactly one of --shards DIR (prepared pairs with HR pixels) or --images DIR")
    budgets = sorted(h * 3600 for h in args.hours) if args.hours else [args.minutes * 60]
    if args.upto is not None:
        budgets = [b for b in budgets if b <= args.upto * 3600 + 1e-6]
    if not budgets:
        raise ConfigError("no budget mark at or below --upto: pass --upto >= the smallest of --hours")
    autoencoder = load_autoencoder("taesd").to(args.device).eval().requires_grad_(False)
    autoencoder.to(memory_format=torch.channels_last)  # NHWC convolutions: the decode 2.3x faster on CPU
    lpips_net = build_lpips().net.to(args.device).requires_grad_(False)
    Curriculum(**recipe.curriculum)  # one-line errors before any data work

    def lpips(image, reference):
        return lpips_net(image, reference, normalize=True).reshape(-1)

    if args.shards:
        stream = shard_stream(args.shards, recipe.batch_size, recipe.seed, args.device, args.pairs)
    else:
        stream = ImageCrops.from_folder(args.images, lambda x: autoencoder.encode(x, sample=False),
                                        recipe.batch_size, seed=recipe.seed, device=args.device,
                                        max_side=args.max_side)
        if args.pool:
            stream.fill_pool(args.pool)
    run_training(recipe, stream, args.run, budgets=budgets, clock=args.clock, decode=autoencoder.decode,
                 lpips=lpips, device=args.device, checkpoint_every=args.checkpoint_every, log=run_log(args.run),
                 name=Path(args.recipe).stem)


def cleaner(args) -> None:
    from latentup.data.degradation import load_degradation
    from latentup.data.worn import WornPairs
    from latentup.training.cleaner import CleanerRecipe, train_cleaner

    recipe = CleanerRecipe.from_file(args.recipe)
    budgets = sorted(h * 3600 for h in args.hours if args.upto is None or h <= args.upto + 1e-9)
    if not budgets:
        raise ConfigError("no budget mark at or below --upto: pass --upto >= the smallest of --hours")
    pairs = WornPairs(str(args.images), load_degradation(recipe.degradation), recipe.patch, recipe.batch_size,
                      recipe.seed)
    train_cleaner(recipe, pairs, args.run, budgets=budgets, clock=args.clock, device=args.device,
                  checkpoint_every=args.checkpoint_every, log=run_log(args.run), name=Path(args.recipe).stem)


def run_log(run: Path):
    """A log function printing each line and appending it to ``run/train.log``."""
    log_file = Path(run) / "train.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    return log


def table(args) -> None:
    rows, references = [], {}
    for run in sorted(map(Path, args.runs)):
        for export in sorted(run.glob("at_*s.safetensors"), key=lambda p: float(p.stem[3:-1])):
            out = run / f"eval_{args.set}_{args.limit}" / export.stem
            if not (out / "summary.json").is_file():
                command = [sys.executable, str(REPO / "evaluate.py"), f"checkpoints=[{export}]",
                           f"sets=[{args.set}]", f"limit={args.limit}", "colour_fix=0", "picture_rows=false", "grids=0",
                           f"output_dir={out}", "progress=false", "device=cpu"]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            scores = json.loads((out / "summary.json").read_text())["sets"][args.set]["rows"]
            references = {k: v for k, v in scores.items() if k != export.stem}
            rows.append((run.name, float(export.stem[3:-1]) / 3600, scores[export.stem]))
    print(f"| recipe | compute (h) | {args.set}[:{args.limit}] PSNR-Y | LPIPS |\n|---|---|---|---|")
    for name, hours, score in rows:
        print(f"| {name} | {hours:g} | {score['psnr_y']:.2f} | {score['lpips']:.4f} |")
    for name, score in references.items():
        print(f"| {name} | | {score['psnr_y']:.2f} | {score['lpips']:.4f} |")


@torch.no_grad()
def cleaner_table(args) -> None:
    """Each cleaner export's LR-level PSNR-Y against the clean LR, per kind of wear, on held-out pictures."""
    from latentup.evaluation.metrics import psnr
    from latentup.nn.cleaner import Cleaner, CleanerConfig
    from latentup.training.cleaner import load_cleaner
    from worn_check import worn_pictures

    names, hrs, worn = worn_pictures(Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")) / "eval" / args.set,
                                     args.limit)
    clean = worn["clean"]

    def score(pictures) -> float:
        return sum(psnr(p[None], c[None], y=True, border=2).item() for p, c in zip(pictures, clean)) / len(clean)

    inputs = {kind: score(pictures) if kind != "clean" else float("inf") for kind, pictures in worn.items()}
    kinds = [k for k in worn if k != "clean"]
    print(f"LR-level PSNR-Y against the clean LR, {args.set}[:{args.limit}] (clean: the cleaned clean picture's "
          "PSNR-Y against itself; worn: the gain over the worn input)\n")
    print("| recipe | compute (h) | steps | clean | " + " | ".join(f"{k} (input {inputs[k]:.2f})" for k in kinds)
          + " |\n|---|---|---|---|" + "---|" * len(kinds))
    for run in sorted(map(Path, args.runs)):
        for export in sorted(run.glob("at_*s.safetensors"), key=lambda p: float(p.stem[3:-1])):
            config, state, meta = load_cleaner(export)
            cleaner = Cleaner(CleanerConfig(**config))
            cleaner.load_state_dict({k: v.float() for k, v in state.items()})
            cleaner.eval()
            scores = {kind: score([cleaner(p[None])[0] for p in pictures]) for kind, pictures in worn.items()}
            print(f"| {run.name} | {float(export.stem[3:-1]) / 3600:g} | {meta['training']['steps']} | "
                  f"{scores['clean']:.2f} dB | "
                  + " | ".join(f"{scores[k] - inputs[k]:+.2f} dB" for k in kinds) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe to its budget marks (resumes)")
    t.add_argument("--recipe", required=True, type=Path)
    t.add_argument("--run", required=True, type=Path, help="run folder (last.pt, exports, train.log)")
    t.add_argument("--shards", type=Path, help="prepared latent pairs with HR pixels (CPU path)")
    t.add_argument("--pairs", type=int, help="--shards: train on the first N pairs only (a fixed pool)")
    t.add_argument("--images", type=Path, help="an image folder, crops encoded on the fly (GPU path)")
    t.add_argument("--max-side", type=int, default=None, help="--images: shrink larger images to this first")
    t.add_argument("--pool", type=int, default=0, help="--images: encode this many crops once, then draw from them "
                   "(0: encode every batch)")
    t.add_argument("--hours", type=float, nargs="*", default=[0.25, 0.5, 1, 2], help="budget marks (clock hours)")
    t.add_argument("--minutes", type=float, default=9, help="one budget of this many minutes when --hours is empty")
    t.add_argument("--upto", type=float, help="stop at the last mark <= this many hours (resume later for more)")
    t.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    t.add_argument("--device", default="cpu")
    t.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    t.add_argument("--init", type=Path, help="start from these weights (overrides the recipe's init_weights)")
    t.add_argument("--checkpoint-every", type=float, default=300, help="clock seconds between last.pt writes")
    t.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("cleaner", help="train a cleaner recipe (configs/cleaner/) to its budget marks (resumes)")
    c.add_argument("--recipe", required=True, type=Path)
    c.add_argument("--run", required=True, type=Path, help="run folder (last.pt, exports, train.log)")
    c.add_argument("--images", type=Path, default=Path(os.environ.get("LATENTUP_DATA", "../shared/datasets")) / "train",
                   help="training images (default: $LATENTUP_DATA/train)")
    c.add_argument("--hours", type=float, nargs="+", default=[0.5, 1, 2], help="budget marks (clock hours)")
    c.add_argument("--upto", type=float, help="stop at the last mark <= this many hours (resume later for more)")
    c.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    c.add_argument("--device", default="cpu")
    c.add_argument("--checkpoint-every", type=float, default=300, help="clock seconds between last.pt writes")
    c.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("table", help="evaluate every export of the runs and print the table")
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--set", default="B100")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--threads", type=int, default=1)
    ct = sub.add_parser("cleaner-table", help="each cleaner export's LR-level gain on held-out worn pictures")
    ct.add_argument("--runs", nargs="+", required=True)
    ct.add_argument("--set", default="B100")
    ct.add_argument("--limit", type=int, default=20)
    ct.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with exit_on_error():
        if args.command == "cleaner-table":
            torch.set_num_threads(args.threads)
            cleaner_table(args)
        elif args.command in ("train", "cleaner"):
            torch.set_num_threads(args.threads)
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution kernels once
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            (train if args.command == "train" else cleaner)(args)
        else:
            table(args)


if __name__ == "__main__":
    main()
