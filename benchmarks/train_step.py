"""Steps/s of one full training step, by default of the released architecture (SPEC §1.2, 372.6 M parameters).

A step is what ``UpscalerModule.training_step`` + Lightning do: the batch's random draws, low-res augmentation and
conditioning, the DenoiserWithVariance loss, backward, gradient clipping, AdamW, the EMA update. Inputs: an HR
latent of ``--size``² (48 = the original 384-px crops), batch ``--batch``, random CLIP-like context / pooled for a
text-conditioned U-Net.

    python benchmarks/train_step.py                          # CPU, fp32
    python benchmarks/train_step.py --device cuda --precision bf16 [--checkpointing] [--compile] [--channels-last]
    python benchmarks/train_step.py --unet bundled --batch 32 --size 32 --precision bf16   # CPU run of default_x2_cpu
    python benchmarks/train_step.py --unet bundled --batch 32 --size 32 --precision bf16 --decoder-loss 4  # + L_dec
    ... --decoder-loss 4 --perceptual 1   # + L_dec with its LPIPS term
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --unet tiny --batch 128 --size 16 --threads 1 --profile

``--unet bundled`` is the architecture of the bundled default model (17.4 M parameters, text-free).
``--unet tiny`` (channels 32/32/64, one ResBlock per level, text-free: 0.33 M parameters) keeps the arithmetic small,
so that on a GPU the step is bound by the host's work (Python, operator dispatch, kernel launches, per-sample
loops): the floor of a step. ``--profile`` prints where the host time goes (torch.profiler, one timed step): the
stages, then the top operators. ``--decoder-loss K`` adds the decoder-space loss (TAESD, ``--decoder-window``
latent px) on one sample in K, ``--perceptual W`` its LPIPS term. Reported times are medians over ``--repeats``
runs of ``--steps`` steps.
"""

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from latentup.nn.unet import UNetConfig
from latentup.training.module import UpscalerModule

TINY = UNetConfig(channels=(32, 32, 64), depths=(1, 1, 1), self_attn=(False, False, True), cross_attn=(False,) * 3,
                  cross_attention_dim=None, head_dim=32, mapping_dim=64, mapping_cond_dim=128)


def bundled_config() -> UNetConfig:
    """The U-Net config stored in the bundled default weights."""
    from latentup.pipeline import default_weights
    from latentup.weights.sources import resolve_weights

    return resolve_weights(default_weights()).unet_config


def inputs(size: int, batch: int, config: UNetConfig) -> dict:
    """A random batch (positions are set per step)."""
    generator = torch.Generator().manual_seed(0)
    out = {"hr": torch.randn(batch, 4, size, size, generator=generator),
           "lr": torch.randn(batch, 4, size // 2, size // 2, generator=generator)}
    if config.cross_attention_dim is not None:
        out |= {"context": torch.randn(batch, 77, config.cross_attention_dim, generator=generator),
                "pooled": torch.randn(batch, config.mapping_cond_dim - 128, generator=generator),
                "mask": torch.ones(batch, 77, dtype=torch.bool)}
    return out


def labelled(name: str, function):
    """``function`` inside a profiler range ``name``."""
    def wrapped(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)
    return wrapped


def main(argv=None) -> dict:
    """Time the training step (``argv``: the command line's arguments); returns the JSON row it printed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights")
    parser.add_argument("--unet", choices=["released", "bundled", "tiny"], default="released")
    parser.add_argument("--size", type=int, default=48, help="HR latent side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every block")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights (the activations follow)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown of one step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decoder-loss", type=int, default=0, metavar="K", help="L_dec on one sample in K (0: off)")
    parser.add_argument("--decoder-window", type=int, default=16, help="L_dec window side in latent px")
    parser.add_argument("--perceptual", type=float, default=0.0, help="weight of L_dec's LPIPS term (0: off)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = {"released": UNetConfig, "tiny": lambda: TINY, "bundled": bundled_config}[args.unet]()
    decoder_loss, autoencoder = None, None
    if args.decoder_loss:
        from latentup.autoencoders import load_autoencoder

        decoder_loss = {"every": args.decoder_loss, "window": args.decoder_window, "perceptual": args.perceptual}
        autoencoder = load_autoencoder("taesd")
    module = UpscalerModule(config, gradient_checkpointing=args.checkpointing, caption_dropout=0.1,
                            validation={"lpips": False}, autoencoder=autoencoder, decoder_loss=decoder_loss).to(device)
    module._helpers_to_device()
    if args.channels_last:
        module.model.unet.to(memory_format=torch.channels_last)
    if args.compile:
        module.model.unet = torch.compile(module.model.unet)
    if config.cross_attention_dim is not None:
        module.empty_prompt = {k: v[:1].to(device) for k, v in inputs(args.size, 1, config).items()
                               if k in ("context", "pooled", "mask")}
    data = {k: v.to(device) for k, v in inputs(args.size, args.batch, config).items()}
    params = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), eps=1e-6, weight_decay=1e-3,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def optimize() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    def step(i: int) -> torch.Tensor:
        position = torch.arange(i * args.batch, (i + 1) * args.batch).to(device, non_blocking=True)
        with autocast:
            loss = module.forward_loss({**data, "position": position}).mean()
        backward(loss)
        optimize()
        module.update_ema()
        return loss.detach()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, i = [], args.warmup
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step(i)
            i += 1
        synchronize()
        seconds.append((time.perf_counter() - start) / args.steps)
    per_step = statistics.median(seconds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": name, "unet": args.unet, "precision": args.precision, "latent": args.size,
              "batch": args.batch, "checkpointing": args.checkpointing, "compile": args.compile,
              "channels_last": args.channels_last,
              "decoder_loss_every": args.decoder_loss, "decoder_window": args.decoder_window,
              "perceptual": args.perceptual,
              "steps_per_sec": 1 / per_step, "ms_per_step": 1e3 * per_step,
              "ms_per_step_runs": [round(1e3 * s, 2) for s in seconds],
              "samples_per_sec": args.batch / per_step, "last_loss": float(loss),
              "trainable_params": sum(p.numel() for p in params)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result))
    if args.profile:
        module.draws = labelled("draws", module.draws)
        module.forward_loss = labelled("forward_loss (incl. draws)", module.forward_loss)
        backward, optimize = labelled("backward", backward), labelled("clip + AdamW", optimize)
        module.update_ema = labelled("EMA", module.update_ema)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            with record_function("step"):
                step(i)
            synchronize()
        events = prof.key_averages()
        stages = ["step", "forward_loss (incl. draws)", "draws", "backward", "clip + AdamW", "EMA"]
        calls = dict.fromkeys(stages, 0)  # operator calls issued by the stage (not nested in another operator)
        for event in prof.events():
            parent = event.cpu_parent
            if event.name.startswith("aten::") and not (parent and parent.name.startswith("aten::")):
                while parent is not None:
                    calls[parent.name] = calls.get(parent.name, 0) + 1
                    parent = parent.cpu_parent
        print(f"{'stage':<28}{'host ms':>8}{'operator calls':>16}")
        for stage, event in ((stage, next(e for e in events if e.key == stage)) for stage in stages):
            print(f"{stage:<28}{event.cpu_time_total / 1e3:8.2f}{calls[stage]:16d}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return result

if __name__ == "__main__":
    main()
