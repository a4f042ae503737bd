"""One-shot CPU runs end to end: diffusers' StableDiffusionLatentUpscalePipeline script against ``infer.py``.

Each run is a separate process doing what a user's one-shot command does: start Python, load the released-size
pipeline from a diffusers folder (372.6 M U-Net, SD KL-f8 VAE, CLIP ViT-L/14 text tower; seeded random weights,
built once by this script), read an SD-scaled latent, sample (Euler, CFG, prompt + negative prompt, seed 0) and save
the 2x latent as safetensors. The two commands alternate run by run (so load on a shared machine hits both alike),
at every step count; the script prints the median wall seconds, the ratio diffusers / latentup and the max |Δ|
between the two saved latents (the bar is 2e-3).

    python benchmarks/cpu_oneshot.py --steps 8 20 --repeats 2 --threads 1

Both processes get the same thread count (OMP_NUM_THREADS and torch.set_num_threads). Needs the test extras
(diffusers, transformers).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEGATIVE, CFG = "a photo of a lighthouse, high resolution", "blurry, grainy", 6.5

# The reference one-shot script: diffusers' own pipeline, load + sample + save, as its documentation writes it.
DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import StableDiffusionLatentUpscalePipeline
from safetensors.torch import load_file, save_file
folder, latent, steps, out, threads, prompt, negative, cfg = sys.argv[1:]
torch.set_num_threads(int(threads))
pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    result = pipe(prompt=prompt, negative_prompt=negative, image=load_file(latent)["latent"],
                  num_inference_steps=int(steps), guidance_scale=float(cfg), output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
save_file({"latent": result.contiguous()}, out)
"""


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command per step count")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", type=int, default=32, help="side of the low-res latent (32 = a 256 px image)")
    parser.add_argument("--folder", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "latentup-oneshot",
                        help="where the released-size diffusers folder, the latent and the outputs live")
    parser.add_argument("--tiny", action="store_true", help="shrunk configs (a smoke test in seconds)")
    parser.add_argument("--extra", nargs="*", default=[], help="more infer.py overrides, e.g. winograd=false")
    parser.add_argument("--out", type=Path, help="append the rows as JSON lines here")
    return parser.parse_args()


def build_folder(folder: Path, tiny: bool, side: int) -> tuple[Path, Path]:
    """The diffusers pipeline folder (released configs, or shrunk ones with --tiny) and the input latent."""
    pipeline, latent = folder / "pipeline", folder / f"latent_{side}.safetensors"
    if not (pipeline / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from sampling import diffusers_pipeline

        pipe = diffusers_pipeline("cpu", torch.float32, tiny=tiny)
        pipe.save_pretrained(folder / "pipeline.tmp", safe_serialization=True)
        os.replace(folder / "pipeline.tmp", pipeline)
    if not latent.is_file():
        low_res = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(side))
        save_file({"latent": low_res}, latent)
    return pipeline, latent


def commands(pipeline: Path, latent: Path, steps: int, threads: int, folder: Path, extra: list[str]) -> dict:
    """The two one-shot commands for ``steps``: name -> (argv, output file)."""
    out = {name: folder / f"{name}_{steps}.safetensors" for name in ("diffusers", "latentup")}
    diffusers = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(pipeline), str(latent), str(steps), str(out["diffusers"]),
                 str(threads), PROMPT, NEGATIVE, str(CFG)]
    infer = [sys.executable, str(ROOT / "infer.py"), f"weights={pipeline}", f"input={latent}",
             f"output={out['latentup']}", f"steps={steps}", f"cfg_scale={CFG}", f"prompt='{PROMPT}'",
             f"negative_prompt='{NEGATIVE}'", "seed=0", "device=cpu", "progress=false", "overwrite=true", *extra]
    return {"diffusers": (diffusers, out["diffusers"]), "latentup": (infer, out["latentup"])}


def timed(argv: list[str], threads: int) -> float:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: {argv[1] if argv[1] != '-c' else 'the diffusers script'} failed "
                         f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def main():
    args = parse()
    args.folder.mkdir(parents=True, exist_ok=True)
    pipeline, latent = build_folder(args.folder, args.tiny, args.side)
    print(f"torch {torch.__version__}, {args.threads} thread(s), latent {args.side}x{args.side} -> "
          f"{2 * args.side}x{2 * args.side}, Euler, CFG {CFG}; {pipeline}", flush=True)
    rows = []
    for steps in args.steps:
        runs = commands(pipeline, latent, steps, args.threads, args.folder, args.extra)
        times = {name: [] for name in runs}
        for repeat in range(args.repeats):  # alternate; swap the order every repeat
            for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                times[name].append(timed(runs[name][0], args.threads))
                print(f"  {steps} steps, {name}: {times[name][-1]:.1f} s", flush=True)
        theirs, ours = (load_file(str(runs[name][1]))["latent"] for name in ("diffusers", "latentup"))
        row = {"steps": steps, "threads": args.threads, "side": args.side, "tiny": args.tiny,
               "diffusers_s": statistics.median(times["diffusers"]), "latentup_s": statistics.median(times["latentup"]),
               "runs_each": args.repeats, "max_abs_diff": (ours - theirs).abs().max().item(),
               "max_abs_out": theirs.abs().max().item(), "extra": args.extra}
        row["ratio"] = row["diffusers_s"] / row["latentup_s"]
        rows.append(row)
        if args.out:
            with args.out.open("a") as file:
                file.write(json.dumps(row) + "\n")
    print("| steps | diffusers s | latentup s | ratio | max abs diff (out scale) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['diffusers_s']:.1f} | {r['latentup_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['max_abs_diff']:.1e} ({r['max_abs_out']:.2f}) |")
    if any(r["max_abs_diff"] > 2e-3 for r in rows):
        raise SystemExit("error: the outputs differ by more than 2e-3")


if __name__ == "__main__":
    main()
