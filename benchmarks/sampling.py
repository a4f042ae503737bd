"""diffusers' StableDiffusionLatentUpscalePipeline against latentup, side by side in one process.

Both run the released configs (372.6 M U-Net, SD KL-f8 VAE, CLIP ViT-L/14 text tower) with the same random
weights, the same low-res latent, prompt, seed, Euler steps and CFG scale. Per size it prints the seconds per
image (median of ``--repeats`` calls after ``--warmup``, the two pipelines alternating), the ratio
diffusers / latentup, peak memory, the latent difference, the U-Net TFLOP per step (one CFG batch of 2) and the
fraction of the device's measured matmul peak that sampling achieved.

    python benchmarks/sampling.py                                  # CPU: 128->256 and 256->512 px, 4 steps
    python benchmarks/sampling.py --device cuda --variants eager eager-nograph reduce-overhead --big 2048
    python benchmarks/sampling.py --tiny --sizes 64 --steps 2      # shrunk configs: a smoke test in seconds

Needs the test extras (diffusers, transformers). Results: a markdown table on stdout, JSON lines in ``--out``.
"""

import argparse
import copy
import ctypes
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentup.autoencoders import load_autoencoder
from latentup.autoencoders.kl import AutoencoderKL, KLConfig
from latentup.diffusion.graphed import GraphedDenoiser
from latentup.nn.unet import UNet, UNetConfig
from latentup.pipeline import Upscaler
from latentup.text.clip import CLIPTextConditioner, TextTowerConfig, hf_to_open_clip
from latentup.text.tokenizer import write_hf_tokenizer_files
from latentup.weights.strict import load_strict

TEXT_CONFIG = {  # SPEC §1.4
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
    "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SCHEDULER_CONFIG = {  # SPEC §1.3
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "interpolation_type": "log_linear", "prediction_type": "original_sample",
}
PROMPT, NEGATIVE = "a photo of a lighthouse, high resolution", "blurry, grainy"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="*", help="input sides in px [cpu: 128 256, cuda: 512 1024]")
    parser.add_argument("--steps", type=int, help="Euler steps [cpu: 4, cuda: 20]")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--threads", type=int, help="CPU threads [torch's default]; 1 is steadier on a busy machine")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", help="both pipelines' weights [cpu: float32, cuda: float16 (diffusers' default)]")
    parser.add_argument("--variants", nargs="+", default=["eager"],
                        help="latentup runs: eager | compile | reduce-overhead (torch.compile modes, the latter with "
                             "CUDA graphs), with suffixes: -nchw / -cl force channels_last off / on (default: the "
                             "Upscaler's), -direct turns the Winograd 3x3 convolutions off (default: on for cpu "
                             "float32), -nograph the CUDA-graph step (default: on for cuda)")
    parser.add_argument("--decode", action="store_true", help="also time the VAE decode of the output")
    parser.add_argument("--reference", action="store_true", help="also diff both against diffusers in float32")
    parser.add_argument("--big", type=int, default=0, help="input side of a latentup-only tiled run (e.g. 2048)")
    parser.add_argument("--big-steps", type=int, default=None, help="steps of the big run [--steps]")
    parser.add_argument("--unet-tile", type=int, default=256, help="U-Net tile (latent px) of the big run; 0: none")
    parser.add_argument("--vae-tile", type=int, default=128, help="VAE tile (latent px) of the big run; 0: none")
    parser.add_argument("--big-autoencoder", help="autoencoder of the big run, a load_autoencoder spec such as "
                                                  "taesd [the released KL VAE]")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; later sizes are skipped after it")
    parser.add_argument("--tiny", action="store_true", help="shrunk configs of the same classes (smoke tests)")
    parser.add_argument("--out", type=Path, default=Path("benchmark.jsonl"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.sizes = args.sizes if args.sizes is not None else ([512, 1024] if cuda else [128, 256])
    args.steps = args.steps or (20 if cuda else 4)
    args.dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    return args


TINY = {  # shrunk configs of the same classes, for smoke tests that run in seconds
    "unet": UNetConfig(channels=(32, 32, 64, 64), depths=(1, 1, 1, 1), head_dim=16, cross_attention_dim=32,
                       mapping_dim=64, mapping_cond_dim=128 + 32),
    "vae": KLConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16),
    "text": TEXT_CONFIG | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                           "num_attention_heads": 4, "projection_dim": 32},
}


def diffusers_pipeline(device: str, dtype: torch.dtype, tiny: bool = False):
    """The released pipeline's classes and configs (``tiny``: shrunk ones) with seeded random weights (no files
    read)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config((TINY["unet"] if tiny else UNetConfig()).to_diffusers())
    vae = DiffusersVAE.from_config((TINY["vae"] if tiny else KLConfig()).to_diffusers())
    text = CLIPTextModel(CLIPTextConfig(**(TINY["text"] if tiny else TEXT_CONFIG)))
    tokenizer = CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(Path(tempfile.mkdtemp()) / "tokenizer"))
    pipe = StableDiffusionLatentUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def latentup_upscalers(pipe, variants: list[str], device: str, dtype: torch.dtype,
                       tiny: bool = False) -> dict[str, Upscaler]:
    """One latentup upscaler per variant (own U-Net and VAE copies, shared text tower), same weights as ``pipe``."""
    unet = load_strict(UNet(UNetConfig.from_diffusers(dict(pipe.unet.config))), pipe.unet.state_dict(), "U-Net")
    vae = AutoencoderKL.from_diffusers(dict(pipe.vae.config), weights=pipe.vae.state_dict())
    text = CLIPTextConditioner(TextTowerConfig.from_hf(TINY["text"] if tiny else TEXT_CONFIG))
    load_strict(text, hf_to_open_clip(pipe.text_encoder.state_dict()), "CLIP text encoder")
    unet, vae, text = unet.to(device, dtype), vae.to(device, dtype), text.to(device, dtype)
    upscalers = {}
    for i, variant in enumerate(variants):
        name, flags = variant, set()
        while name.rsplit("-", 1)[-1] in ("nchw", "cl", "direct", "nograph"):
            name, flag = name.rsplit("-", 1)
            flags.add(flag)
        mode = {"eager": None, "compile": "default"}.get(name, name)
        modules = (unet, vae) if i == 0 else (copy.deepcopy(unet), copy.deepcopy(vae))
        nhwc = True if "cl" in flags else False if "nchw" in flags else None
        upscaler = Upscaler(*modules, text, channels_last=nhwc, compile=mode,
                            winograd=False if "direct" in flags else None)
        layout = torch.channels_last if upscaler.channels_last else torch.contiguous_format
        for module in modules:  # the weights in the layout of the activations (as from_pretrained stores them)
            module.to(memory_format=layout)
        if "nograph" in flags and isinstance(upscaler.denoiser, GraphedDenoiser):
            upscaler.denoiser.enabled = False
        upscalers[variant] = upscaler
    return upscalers


class Meter:
    """Wall time and peak memory above the starting point of one call (CUDA allocator, or the process RSS)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so that the RSS shows what a call needs
            base = _rss("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS (Linux)
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if self.cuda else _rss("VmHWM")
        return out, seconds, (peak - base) / 2**30


def _rss(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def unet_tflop(latent_side: int, batch: int = 2, config: UNetConfig | None = None) -> float:
    """TFLOP of one U-Net evaluation (counted on the meta device: shapes only)."""
    config = config or UNetConfig()
    with torch.device("meta"):
        net = UNet(config)
        x, c = torch.empty(batch, config.in_channels, latent_side, latent_side), torch.empty(batch)
        cond, ctx = torch.empty(batch, config.mapping_cond_dim), torch.empty(batch, 77, config.cross_attention_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, c, cond, ctx)
    return counter.get_total_flops() / 1e12


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in TFLOP/s (the 'peak' the achieved fraction refers to)."""
    n = 8192 if device.startswith("cuda") else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    meter = Meter(device)
    for _ in range(3):
        a @ b
    runs = [meter(lambda: a @ b)[1] for _ in range(10)]
    return 2 * n**3 / statistics.median(runs) / 1e12


def run_size(args, pipe, ours: dict[str, Upscaler], size: int, reference: torch.Tensor | None,
             peak: float) -> list[dict]:
    meter, side = Meter(args.device), size // 8
    low_res = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(size)).to(args.device, args.dtype)
    settings = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": args.steps, "cfg_scale": args.cfg, "seed": 0}

    def theirs():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=low_res, num_inference_steps=args.steps,
                    guidance_scale=args.cfg, generator=torch.Generator().manual_seed(0), output_type="latent").images

    runs = {"diffusers": theirs} | {f"latentup {v}": (lambda u=u: u.upscale_latent(low_res, **settings))
                                    for v, u in ours.items()}
    times, peaks, outputs, first = {k: [] for k in runs}, {k: 0.0 for k in runs}, {}, {}
    with torch.no_grad():
        for _ in range(args.warmup):  # compiles, captures CUDA graphs
            for name, fn in list(runs.items()):
                try:
                    out, seconds, _ = meter(fn)
                    outputs[name] = out.float()
                    first.setdefault(name, seconds)
                except Exception as error:  # noqa: BLE001 - report a variant that fails, keep the others
                    print(f"{name} failed at {size} px: {type(error).__name__}: {error}"[:2000], flush=True)
                    del runs[name]
        for _ in range(args.repeats):  # alternate, so that load on a shared machine hits all alike
            for name, fn in runs.items():
                _, seconds, memory = meter(fn)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], memory)
        decode = {}
        if args.decode:  # both untiled: the same work
            latent, vae = outputs["diffusers"].to(args.dtype), next(iter(ours.values())).autoencoder
            vae_theirs = lambda: pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
            vae_ours = lambda: vae._decode_raw(latent / vae.scaling_factor).clamp(0, 1)
            for name, fn in (("diffusers", vae_theirs), ("latentup", vae_ours)):
                fn()
                decode[name] = statistics.median(meter(fn)[1] for _ in range(args.repeats))
    flop = unet_tflop(2 * side, config=TINY["unet"] if args.tiny else None)
    base = statistics.median(times["diffusers"])
    rows = []
    for name in runs:
        seconds = statistics.median(times[name])
        row = {
            "size": f"{size}->{2 * size}", "run": name, "device": args.device, "dtype": str(args.dtype).split(".")[-1],
            "steps": args.steps, "cfg": args.cfg, "seconds": seconds, "first_call_seconds": first.get(name),
            "ratio": base / seconds, "peak_gib": peaks[name],
            "max_abs_diff": (outputs[name] - outputs["diffusers"]).abs().max().item(),
            "max_abs_out": outputs["diffusers"].abs().max().item(), "unet_tflop_per_step": flop,
            "peak_tflops": peak, "fraction_of_peak": flop * args.steps / seconds / peak,
        }
        if reference is not None:
            row["max_abs_diff_fp32"] = (outputs[name] - reference).abs().max().item()
        if decode:
            row["decode_seconds"] = decode["diffusers" if name == "diffusers" else "latentup"]
        rows.append(row)
    return rows


def run_big(args, upscaler: Upscaler) -> dict:
    """latentup alone on a big input, with the VAE and U-Net tiled: time and peak memory, decode included."""
    steps = args.big_steps or args.steps
    side = args.big // 8
    low_res = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)).to(args.device, args.dtype)
    if args.big_autoencoder:
        upscaler.autoencoder = load_autoencoder(args.big_autoencoder).to(args.device, args.dtype).eval()
    upscaler = upscaler.with_options(unet_tile=args.unet_tile or None, vae_tile=args.vae_tile or None)
    meter = Meter(args.device)

    def full():
        latent = upscaler.upscale_latent(low_res, prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps,
                                         cfg_scale=args.cfg)
        return upscaler.autoencoder.decode(latent.to(args.dtype))

    with torch.no_grad():
        image, seconds, memory = meter(full)
    tiles = f"unet {args.unet_tile or None}, {args.big_autoencoder or 'vae'} {args.vae_tile or None}"
    return {"size": f"{args.big}->{2 * args.big}", "run": f"latentup tiles: {tiles}", "device": args.device,
            "dtype": str(args.dtype).split(".")[-1], "steps": steps, "cfg": args.cfg, "seconds": seconds,
            "peak_gib": memory, "image": list(image.shape)}


def table(rows: list[dict]) -> str:
    columns = ["size", "run", "seconds", "first_call_seconds", "ratio", "decode_seconds", "peak_gib", "max_abs_diff",
               "max_abs_out", "max_abs_diff_fp32", "unet_tflop_per_step", "fraction_of_peak"]
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    """Run the comparison (``argv``: the command line's arguments); returns the rows it printed."""
    args = parse(argv)
    deadline = time.perf_counter() + args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}", torch.cuda.get_device_name() if args.device.startswith("cuda") else "")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 stays fp32 on both sides
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per size
    peak = matmul_peak(args.device, args.dtype)
    print(f"{args.device}: measured {args.dtype!s} matmul peak {peak:.3g} TFLOP/s, {torch.get_num_threads()} threads")
    pipe = diffusers_pipeline(args.device, torch.float32 if args.reference else args.dtype, tiny=args.tiny)
    references = {}
    if args.reference:
        with torch.no_grad():
            for size in args.sizes:
                low_res = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(size))
                references[size] = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=low_res.to(args.device),
                                        num_inference_steps=args.steps, guidance_scale=args.cfg, output_type="latent",
                                        generator=torch.Generator().manual_seed(0)).images.float()
        pipe.to(args.device, args.dtype)
    ours = latentup_upscalers(pipe, args.variants, args.device, args.dtype, tiny=args.tiny)
    rows = []
    with args.out.open("a") as out:
        for size in args.sizes:
            if time.perf_counter() > deadline:
                print(f"budget spent: {size} px skipped")
                continue
            for row in run_size(args, pipe, ours, size, references.get(size), peak):
                rows.append(row)
                out.write(json.dumps(row) + "\n")
            print(table([r for r in rows if r["size"] == f"{size}->{2 * size}"]), flush=True)
        if args.big and time.perf_counter() < deadline:
            del pipe
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            row = run_big(args, next(iter(ours.values())))
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
