"""Training the cleaner (``latentup.nn.cleaner``): worn low-res pictures in, the clean ones out.

    L = |C(worn) - clean|_2^2      (pixels in [0, 1]: the PSNR term; with L1 the cleaner stayed the identity,
                                    the median of JPEG's peaked error being ~0)

on (worn, clean) pairs from ``latentup.data.worn.WornPairs``. A plain-PyTorch loop like the one-step trainer's:
AdamW with a linear warm-up, then cosine decay to ``lr_final`` over ``decay_seconds`` of the clock; an EMA of the
weights; ``last.pt`` resumes step, optimizer, EMA and clock; the EMA weights are exported at each budget mark of
process CPU time (or wall time) to ``at_<seconds>s.safetensors``, so that designs compare at equal compute.
"""

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentup.atomic import write_atomic
from latentup.errors import WeightsMismatchError
from latentup.nn.cleaner import Cleaner, CleanerConfig
from latentup.training.ema import ema_decay, ema_update
from latentup.training.budget import Clock, RecipeFile, resume

CLEANER_FORMAT = "latentup.cleaner/1"


@dataclass
class CleanerRecipe(RecipeFile):
    """A cleaner recipe (a YAML file in ``configs/cleaner/``)."""

    cleaner: dict = field(default_factory=dict)   # CleanerConfig fields
    degradation: str = "realistic"                # a configs/degradation/ name or a YAML path
    patch: int = 96                               # low-res patch side (px)
    batch_size: int = 16
    lr: float = 4e-4
    lr_final: float = 1e-5
    decay_seconds: float = 7200.0                 # cosine decay over this many clock seconds
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_power: float = 0.75
    bf16: bool = True
    seed: int = 0

    def lr_at(self, step: int, seconds: float) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup))
        t = min(1.0, seconds / self.decay_seconds)
        return warm * (self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * t)))


def save_cleaner(path: Path, cleaner: Cleaner, meta: dict) -> Path:
    """The cleaner's weights (fp16) with its config: ``cleaner.<key>`` tensors, metadata format/config/meta."""
    tensors = {f"cleaner.{k}": v.detach().cpu().half().contiguous() for k, v in cleaner.state_dict().items()}
    metadata = {"format": CLEANER_FORMAT, "cleaner_config": json.dumps(cleaner.config_dict()),
                "meta": json.dumps(meta)}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_cleaner(path: str | Path) -> tuple[dict, dict, dict]:
    """(config, state, meta) of a cleaner file written by :func:`save_cleaner`."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CLEANER_FORMAT:
            raise WeightsMismatchError(f"{path} is not a latentup cleaner file (format={metadata.get('format')!r})")
        state = {k[len("cleaner."):]: f.get_tensor(k) for k in f.keys()}
    return json.loads(metadata["cleaner_config"]), state, json.loads(metadata.get("meta", "{}"))


def bundle(upscaler: str | Path, cleaner: str | Path, output: str | Path, recommended: dict | None = None) -> Path:
    """A latentup upscaler file with ``cleaner``'s weights added (replacing any it had), and its recommended
    settings updated with ``recommended`` (e.g. ``{"restore": True}``)."""
    from latentup.weights.single_file import load_upscaler, save_upscaler

    file = load_upscaler(upscaler)
    config, state, _ = load_cleaner(cleaner)
    meta = {**file.meta, "cleaner": config,
            "recommended": {**file.meta.get("recommended", {}), **(recommended or {})}}
    return save_upscaler(output, file.unet_state, file.unet_config, file.noise_fourier, meta, cleaner_state=state)


def train_cleaner(recipe: CleanerRecipe, batches: Callable[[int], Iterator[dict]], run_dir: str | Path, *,
                  budgets: list[float], clock: str = "cpu", device: str = "cpu", checkpoint_every: float = 600.0,
                  log: Callable[[str], None] = print, name: str = "") -> Path:
    """Train until the clock reaches ``max(budgets)`` seconds, resuming from ``run_dir/last.pt``; exports the EMA
    weights at each mark to ``run_dir/at_<b>s.safetensors`` and returns the last export."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = Cleaner(CleanerConfig(**recipe.cleaner)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    step, spent = 0, 0.0
    last = run_dir / "last.pt"
    state = resume(last, model, ema, optimizer, device)
    if state is not None:
        step, spent = int(state["step"]), float(state["seconds"])
        log(f"resumed {last} at step {step}, {spent:.0f} {clock} s")
    params = list(model.parameters())
    log(f"{name}: {sum(p.numel() for p in params) / 1e6:.3f} M parameters, budgets {budgets} {clock} s")
    timer = Clock(clock, spent)

    def save() -> None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "seconds": timer(), "recipe": json.dumps(asdict(recipe))}
        write_atomic(last, lambda tmp: torch.save(state, tmp))

    marks = sorted(b for b in budgets if b > spent)
    next_save, exported = timer() + checkpoint_every, run_dir / "none"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.bf16)
    total, worn_mse, logged, started, first = 0.0, 0.0, step, time.perf_counter(), step
    for batch in batches(step):
        now = timer()
        while marks and now >= marks[0]:
            meta = {"training": {"experiment": name, "recipe": asdict(recipe), "steps": step, "weights": "ema",
                                 "seconds": round(now, 1), "clock": clock}}
            exported = save_cleaner(run_dir / f"at_{marks.pop(0):.0f}s.safetensors", ema, meta)
            log(f"exported {exported} at step {step}")
        if now >= next_save or not marks:
            save()
            next_save = now + checkpoint_every
        if not marks:
            break
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step, now)
        worn, clean = batch["worn"].to(device), batch["clean"].to(device)
        with autocast:
            loss = (model(worn).float() - clean).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        ema_update(ema, model, ema_decay(step, recipe.ema_power))
        step += 1
        total += float(loss.detach())
        worn_mse += float((worn - clean).square().mean())
        if step % 100 == 0:
            rate = (step - first) * recipe.batch_size / (time.perf_counter() - started)
            log(f"step {step} {timer():.0f} s {rate:.1f} samples/s mse {total / (step - logged):.3e} "
                f"(inputs {worn_mse / (step - logged):.3e}, {10 * math.log10(worn_mse / total):+.2f} dB) "
                f"lr {optimizer.param_groups[0]['lr']:.2e}")
            total, worn_mse, logged = 0.0, 0.0, step
    return exported
