"""The GPU check of issue 23 in one call: sampling speed against diffusers, compile, bf16, decoders, training, and a
correctness check against float32; one table at the end (markdown on stdout, JSON lines in ``--out``).

    python benchmarks/gpu_check.py                         # CUDA, released configs, seeded random weights
    python benchmarks/gpu_check.py --device cpu --tiny     # smoke test of every part that runs without a GPU

Parts, in order (each is skipped, and says so, when the ``--budget`` would not cover it):
  sampling   diffusers fp16 against latentup's CUDA default (eager: NCHW + the CUDA-graph step), the same without
             the graph step and with channels_last, at 512->1024 and 1024->2048, 20 Euler steps, CFG 7.5; both
             outputs diffed against diffusers in float32 (bar: 0.05 at output scale ~9); VAE decode of the output.
  bf16       the same at 512->1024 in bfloat16 (both pipelines).
  decoders   the KL VAE's and TAESD's decode of a 1024 px output, alone.
  training   samples/s of a training step of experiment=default_x2's U-Net (the bundled model's) and of the
             released-size U-Net, bf16 autocast, fused AdamW, NCHW and channels_last.
  compile    latentup with compile=reduce-overhead (what compile=auto picks) in two fresh processes sharing an
             inductor cache (TORCHINDUCTOR_CACHE_DIR): 512->1024 then 1024->2048 (the second size compiles the
             dynamic graph), cold then warm; the first call's extra time (= compile or cache load),
             the fraction of the measured fp16 matmul peak, and the images after which compiling pays against the
             eager CUDA default (compile=auto's threshold).
  training-compile  the two training runs with torch.compile.

On a bare H200 machine (torch present, no network) diffusers and open-clip-torch travel as wheels in ``.whl/``;
``benchmarks/gpu_check.sh`` installs them from there and runs this script (docs/performance.md, GPU section).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sampling  # noqa: E402  (benchmarks/sampling.py)
import train_step  # noqa: E402  (benchmarks/train_step.py)

ROOT = Path(__file__).resolve().parent.parent
ESTIMATE_S = {"sampling": 150, "bf16": 60, "decoders": 15, "training": 80, "compile": 260,
              "training-compile": 150}  # seconds on an H200 (guesses; a part is skipped when the budget is short)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="shrunk configs, small sizes, one repeat (smoke test)")
    parser.add_argument("--parts", nargs="+", default=list(ESTIMATE_S), choices=list(ESTIMATE_S))
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (one 9-minute call "
                                                                  "with the wheels' install and the start-up)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.jsonl")
    return parser.parse_args(argv)


def sampling_args(args, dtype: str, sizes: list[int], variants: list[str], out: Path, extra=()) -> list[str]:
    """benchmarks/sampling.py's arguments for this check (tiny: 2 steps, one repeat)."""
    common = ["--device", args.device, "--dtype", dtype, "--cfg", "7.5", "--out", str(out), "--variants", *variants,
              "--sizes", *map(str, sizes)]
    if args.tiny:
        return [*common, "--tiny", "--steps", "2", "--repeats", "1", "--threads", "1", *extra]
    return [*common, "--steps", "20", "--repeats", "3", *extra]


def part_sampling(args, scratch: Path) -> list[dict]:
    sizes = [64] if args.tiny else [512, 1024]
    variants = ["eager", "eager-direct"] if args.device == "cpu" else ["eager", "eager-nograph", "eager-cl"]
    return sampling.main(sampling_args(args, "float16" if args.device != "cpu" else "float32", sizes, variants,
                                       scratch / "sampling.jsonl", ["--reference", "--decode"]))


def part_bf16(args, scratch: Path) -> list[dict]:
    size = [64] if args.tiny else [512]
    return sampling.main(sampling_args(args, "bfloat16", size, ["eager"], scratch / "bf16.jsonl", ["--reference"]))


def part_decoders(args, scratch: Path) -> list[dict]:
    """Decode seconds (median of 3 after a warm-up) of the KL VAE and TAESD, random weights, fp16 on CUDA."""
    from latentup.autoencoders.kl import AutoencoderKL, KLConfig
    from latentup.autoencoders.taesd import TAESD

    dtype = torch.float16 if args.device != "cpu" else torch.float32
    side = 8 if args.tiny else 128
    latent = torch.randn(1, 4, side, side, device=args.device, dtype=dtype)
    vae_config = sampling.TINY["vae"] if args.tiny else KLConfig()
    rows = []
    for name, model in (("KL VAE", AutoencoderKL(vae_config)), ("TAESD", TAESD())):
        model = model.to(args.device, dtype).eval()
        model.tile_size = None
        meter = sampling.Meter(args.device)
        with torch.no_grad():
            meter(lambda: model.decode(latent))
            runs = [meter(lambda: model.decode(latent)) for _ in range(3)]
        seconds = sorted(r[1] for r in runs)[1]
        rows.append({"part": "decoders", "run": f"{name} decode, {8 * side} px", "seconds": seconds,
                     "peak_gib": max(r[2] for r in runs), "dtype": str(dtype).split(".")[-1]})
    return rows


def part_training(args, scratch: Path, levers=("", "--channels-last")) -> list[dict]:
    if args.tiny:
        models = [["--unet", "tiny", "--batch", "2", "--size", "16"]]
        common = ["--device", args.device, "--steps", "1", "--warmup", "1", "--threads", "1"]
    else:  # experiment=default_x2's batch and crop (256 px = 32 latent px); the released U-Net at its 384 px crops
        models = [["--unet", "bundled", "--batch", "128", "--size", "32"],
                  ["--unet", "released", "--batch", "16", "--size", "48"]]
        common = ["--device", args.device, "--precision", "bf16", "--steps", "10", "--warmup", "3", "--repeats", "2"]
    rows = []
    for model in models:
        for lever in levers:
            run = [*model, lever] if lever else model
            rows.append({"run": " ".join(run), **train_step.main([*common, *run])})
    return rows


def part_training_compile(args, scratch: Path) -> list[dict]:
    if args.device == "cpu":
        return [{"run": "skipped", "note": "compile is for CUDA"}]
    return part_training(args, scratch, levers=("--compile",))


def part_compile(args, scratch: Path) -> list[dict]:
    """Two fresh processes with one inductor cache: the first compiles (cold), the second reads the cache."""
    if args.device == "cpu":
        return [{"run": "skipped", "note": "compile is for CUDA (inductor on a CPU: ~80 s per size)"}]
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}
    rows = []
    for cache, sizes in (("cold", [512, 1024]), ("warm", [512, 1024])):
        out = scratch / f"compile_{cache}.jsonl"
        argv = sampling_args(args, "float16", sizes, ["reduce-overhead"], out)
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling.py"), *argv], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            rows.append({"run": f"{cache} cache", "error": done.stderr.strip()[-500:]})
            break
        for row in map(json.loads, out.read_text().splitlines()):
            if row["run"] != "diffusers":
                row["compile_seconds"] = row["first_call_seconds"] - row["seconds"]
            rows.append({**row, "run": f"{row['run']} ({cache} cache)"})
    return rows


PARTS = {"sampling": part_sampling, "bf16": part_bf16, "decoders": part_decoders, "training": part_training,
         "compile": part_compile, "training-compile": part_training_compile}


def checks(rows: list[dict]) -> list[str]:
    """The issue's bars, read off the rows: item 1's ratios, item 2's fraction of peak, fp16 against float32."""
    lines = []
    for row in rows:
        run, size = row.get("run", ""), row.get("size")
        if row.get("part") == "sampling" and run == "latentup eager" and size in ("512->1024", "1024->2048"):
            bar = 2.5 if size == "512->1024" else 2.0
            lines.append(f"item 1, {size}: CUDA default {row['ratio']:.2f}x diffusers (bar {bar}x): "
                         f"{'met' if row['ratio'] >= bar else 'SHORT'}")
        if row.get("part") == "sampling" and run.startswith("latentup") and "max_abs_diff_fp32" in row:
            ok = row["max_abs_diff_fp32"] <= 0.05
            lines.append(f"correctness, {size} {run} {row['dtype']}: max |d| to float32 {row['max_abs_diff_fp32']:.3g} "
                         f"(output scale {row['max_abs_out']:.3g}, bar 0.05): {'met' if ok else 'SHORT'}")
        if row.get("part") == "compile" and "(warm cache)" in run and run.startswith("latentup"):
            ok = row["fraction_of_peak"] >= 0.4
            eager = next((r["seconds"] for r in rows if r.get("part") == "sampling" and r.get("size") == size
                          and r.get("run") == "latentup eager" and r.get("dtype") == row.get("dtype")), None)
            pays = (f"; pays after {row['compile_seconds'] / (eager - row['seconds']):.0f} images against eager "
                    f"{eager:.3f} s" if eager and eager > row["seconds"] else "")
            lines.append(f"item 2, {size}: compiled {row['seconds']:.3f} s / image, {row['fraction_of_peak']:.0%} of "
                         f"peak (bar 40 %): {'met' if ok else 'SHORT'}; "
                         f"first call +{row.get('compile_seconds', 0):.1f} s"
                         f" with the warm cache{pays}")
    return lines


def table(rows: list[dict]) -> str:
    columns = ["part", "size", "run", "dtype", "precision", "seconds", "ratio", "first_call_seconds", "compile_seconds",
               "fraction_of_peak", "max_abs_diff_fp32", "max_abs_out", "decode_seconds", "samples_per_sec",
               "peak_gib", "peak_memory_gib", "note", "error"]
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.get(c) for c in columns]
        lines.append("| " + " | ".join("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    start = time.perf_counter()
    if args.device.startswith("cuda"):
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.parts:
            left = args.budget - (time.perf_counter() - start)
            if not args.tiny and left < ESTIMATE_S[name]:
                rows.append({"part": name, "run": "skipped", "note": f"{left:.0f} s left of the budget"})
                continue
            part_start = time.perf_counter()
            try:
                got = PARTS[name](args, Path(scratch))
            except Exception as error:  # noqa: BLE001 - one failing part must not hide the others' figures
                got = [{"part": name, "run": "failed", "error": f"{type(error).__name__}: {error}"[:500]}]
            rows += [{"part": name, **row} for row in got]
            print(f"== {name}: {time.perf_counter() - part_start:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    print(f"\ngpu_check: {time.perf_counter() - start:.0f} s, device {args.device}{' (tiny)' if args.tiny else ''}")
    print(table(rows))
    print("\n".join(checks(rows)))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
