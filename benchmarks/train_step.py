"""Steps/s of one full training step of the released architecture (SPEC §1.2, 372.6 M parameters).

A step is what ``UpscalerModule.training_step`` + Lightning do: per-sample draws, low-res augmentation and
conditioning, the DenoiserWithVariance loss, backward, gradient clipping, AdamW, the EMA update. Inputs: an HR
latent of ``--size``² (48 = the original 384-px crops), batch ``--batch``, random CLIP-like context / pooled.

    python benchmarks/train_step.py                          # CPU, fp32
    python benchmarks/train_step.py --device cuda --precision bf16 [--checkpointing] [--compile]
"""

import argparse
import json
import time

import torch

from latentup.nn.unet import UNetConfig
from latentup.training.ema import ema_update
from latentup.training.module import UpscalerModule


def batch_for(size: int, batch: int, config: UNetConfig, step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {"hr": torch.randn(batch, 4, size, size, generator=generator),
            "lr": torch.randn(batch, 4, size // 2, size // 2, generator=generator),
            "context": torch.randn(batch, 77, config.cross_attention_dim, generator=generator),
            "pooled": torch.randn(batch, config.mapping_cond_dim - 128, generator=generator),
            "mask": torch.ones(batch, 77, dtype=torch.bool),
            "position": torch.arange(step * batch, (step + 1) * batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights")
    parser.add_argument("--size", type=int, default=48, help="HR latent side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every block")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = UNetConfig()
    module = UpscalerModule(config, gradient_checkpointing=args.checkpointing, caption_dropout=0.1,
                            validation={"lpips": False}).to(device)
    if args.compile:
        module.model.unet = torch.compile(module.model.unet)
    module.empty_prompt = {k: v[:1].to(device) for k, v in batch_for(args.size, 1, config, -1).items()
                           if k in ("context", "pooled", "mask")}
    params = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), eps=1e-6, weight_decay=1e-3,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> float:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch_for(args.size, args.batch, config, i).items()}
        with autocast:
            loss = module.forward_loss(batch).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(module.model_ema, module.model, 0.999)
        return float(loss.detach())

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": name, "precision": args.precision, "latent": args.size, "batch": args.batch,
              "checkpointing": args.checkpointing,
              "compile": args.compile, "steps_per_sec": args.steps / seconds, "seconds_per_step": seconds / args.steps,
              "samples_per_sec": args.steps * args.batch / seconds, "last_loss": loss,
              "trainable_params": sum(p.numel() for p in params)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result))


if __name__ == "__main__":
    main()
