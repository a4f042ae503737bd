"""One-step upscaler trained with losses on the decoded image, run by the existing multi-step machinery.

The model is the usual ``KarrasDenoiser`` D(x; σ | LR), used at a single noise level σ_max = 14.6146 (SD's). The
pipeline's ``sampler=euler steps=1 schedule=exponential`` draws x = σ_max·n and takes one Euler step on the grid
[σ_max, 0]:

    x_out = x + (x − D(x; σ_max)) / σ_max · (0 − σ_max) = D(σ_max·n; σ_max | LR)

so training D at that one σ trains exactly what ``infer.py`` and ``evaluate.py`` run when the weights' metadata
recommends ``RECOMMENDED``; nothing downstream changes. With c_skip = 1/(σ²+1) and c_in·σ ≈ 1 the U-Net sees n on
its first 4 channels and learns to cancel the c_skip·σ·n ≈ 0.068·n it adds to the output.

Per sample (z_lr, z_hr, HR pixels), with ẑ = D(σ_max·n; σ_max | z_lr) and a window W of ``window``² latent px
(one random place per batch; the whole crop when ``window`` is 0):

    L = a(t)·|ẑ − z_hr|₁ + b(t)·(pixel_l1·|dec(ẑ[W]) − HR[W]|₁ + pixel_mse·|dec(ẑ[W]) − HR[W]|₂²
                                + lpips·LPIPS-alex(dec(ẑ[W]), HR[W]))

a curriculum over the step t (as LUA, arXiv 2511.10629): b ramps 0 → 1 linearly over [latent_only,
latent_only + ramp), a from latent_l1 to latent_final alongside (decoding is skipped while b = 0). Images in [0, 1].

``train`` is a plain-PyTorch loop (no Lightning / Hydra, so it runs on a bare GPU machine too): AdamW with a linear
warm-up, the EMA of ``latentup.training.ema``, bf16 autocast, checkpoints that resume step, optimizer, EMA, RNG and
the CPU or wall seconds spent, and exports (the EMA weights with ``RECOMMENDED`` in the metadata) at each budget
mark, so that recipes can be compared at equal compute.
"""

import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from latentup.atomic import write_atomic
from latentup.diffusion.conditioning import low_res_conditioning
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.schedules import SIGMA_MAX
from latentup.errors import ConfigError
from latentup.nn.unet import UNet, UNetConfig
from latentup.training.budget import Clock, RecipeFile, resume
from latentup.training.ema import ema_decay, ema_update
from latentup.weights.single_file import save_upscaler

RECOMMENDED = {"sampler": "euler", "steps": 1, "schedule": "exponential", "colour_fix": 0.0, "back_projection": 10}


def predict(denoiser: KarrasDenoiser, low_res: Tensor, noise: Tensor, noise_fourier: Tensor | None = None) -> Tensor:
    """ẑ = D(σ_max·n; σ_max | low_res): what ``RECOMMENDED`` sampling returns for the starting noise n."""
    batch = len(low_res)
    image_cond, embed = low_res_conditioning(low_res, torch.zeros(batch, device=low_res.device), noise_fourier)
    mapping = embed if denoiser.unet.config.mapping_cond_dim else None
    sigma = torch.full((batch,), SIGMA_MAX, device=low_res.device)
    return denoiser(noise * SIGMA_MAX, sigma, image_cond=image_cond, mapping_cond=mapping)


@dataclass(frozen=True)
class Curriculum:
    """Loss weights over the step t (module docstring)."""

    latent_l1: float = 1.0
    latent_final: float = 0.1
    pixel_l1: float = 1.0
    pixel_mse: float = 0.0  # the PSNR term (mean squared error of [0, 1] pixels)
    lpips: float = 1.0
    latent_only: int = 0   # steps of latent L1 alone
    ramp: int = 0          # steps over which the decoded-image terms come in
    window: int = 16       # decoded window side in latent px (0: the whole crop)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value >= 0:
                raise ConfigError(f"curriculum.{name} must be >= 0, got {value}")

    def weights(self, step: int) -> tuple[float, float]:
        """(a, b): the latent and the decoded-image weights at step ``step``."""
        b = min(1.0, max(0.0, (step - self.latent_only + 1) / self.ramp)) if self.ramp else float(
            step >= self.latent_only)
        return self.latent_l1 + (self.latent_final - self.latent_l1) * b, b


def window(shape, side: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of one random ``side``² window of a latent of spatial ``shape`` (all: side 0)."""
    sides = [min(side, n) if side else n for n in shape]
    top, left = (int(torch.randint(0, n - k + 1, (), generator=generator)) for n, k in zip(shape, sides))
    return top, left, *sides


def one_step_loss(denoiser, batch: dict, step: int, curriculum: Curriculum, decode: Callable,
                  lpips: Callable | None, generator: torch.Generator, noise_fourier: Tensor | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """(mean loss, its detached terms) for a batch {hr, lr: latents, hr_pixels: uint8 or [0, 1] HR images}."""
    hr, lr = batch["hr"], batch["lr"]
    noise = torch.randn(hr.shape, generator=generator).to(hr.device)
    out = predict(denoiser, lr, noise, noise_fourier).float()
    a, b = curriculum.weights(step)
    terms = {"latent_l1": (out - hr).abs().mean()}
    loss = a * terms["latent_l1"]
    if b > 0:
        top, left, h, w = window(hr.shape[-2:], curriculum.window, generator)
        f = batch["hr_pixels"].shape[-1] // hr.shape[-1]
        pixels = batch["hr_pixels"][..., top * f:(top + h) * f, left * f:(left + w) * f]
        reference = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()
        latent = out[..., top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        image = decode(latent).float()
        terms["pixel_l1"] = (image - reference).abs().mean()
        terms["pixel_mse"] = (image - reference).square().mean()
        loss = loss + b * (curriculum.pixel_l1 * terms["pixel_l1"] + curriculum.pixel_mse * terms["pixel_mse"])
        if curriculum.lpips and lpips is not None:
            terms["lpips"] = lpips(image, reference).mean()
            loss = loss + b * curriculum.lpips * terms["lpips"]
    return loss, {k: v.detach() for k, v in terms.items()}


@dataclass
class Recipe(RecipeFile):
    """A training recipe: the U-Net, the curriculum and the optimisation (a YAML file in configs/one_step/)."""

    unet: dict = field(default_factory=dict)
    curriculum: dict = field(default_factory=dict)
    init_weights: str | None = None   # start from weights (a latentup file, "bundled"); null: random
    batch_size: int = 8
    lr: float = 2e-4
    warmup: int = 100                 # steps of linear LR warm-up
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_power: float = 0.75
    bf16: bool = True                 # bf16 autocast (CPUs with AMX, GPUs)
    seed: int = 0



def build_denoiser(recipe: Recipe) -> tuple[KarrasDenoiser, Tensor | None]:
    """(denoiser, noise Fourier weights or None) from the recipe, initialised from ``init_weights`` if set."""
    if recipe.init_weights is None:
        return KarrasDenoiser(UNet(UNetConfig(**recipe.unet))), None
    from latentup.pipeline import default_weights
    from latentup.weights.sources import resolve_weights
    from latentup.weights.strict import load_strict

    parts = resolve_weights(default_weights() if recipe.init_weights == "bundled" else recipe.init_weights)
    if recipe.unet and UNetConfig(**recipe.unet) != parts.unet_config:
        raise ConfigError(f"init_weights {recipe.init_weights} has U-Net config {parts.unet_config}, the recipe "
                          f"says {recipe.unet}: drop the recipe's unet or make them agree")
    unet = UNet(parts.unet_config)
    load_strict(unet, {k: v.float() for k, v in parts.unet_state.items()}, "U-Net")
    return KarrasDenoiser(unet), parts.noise_fourier


def export(path: Path, denoiser: KarrasDenoiser, noise_fourier: Tensor | None, meta: dict) -> Path:
    """The weights as latentup's single file (fp16), recommending one-step sampling."""
    return save_upscaler(path, denoiser.unet.state_dict(), asdict(denoiser.unet.config), noise_fourier,
                         {"autoencoder": "taesd", "text_encoder": None, "recommended": RECOMMENDED, **meta},
                         dtype=torch.float16)


def train(recipe: Recipe, batches: Callable[[int], Iterator[dict]], run_dir: str | Path, *, budgets: list[float],
          clock: str = "cpu", decode: Callable, lpips: Callable | None, device: str = "cpu",
          checkpoint_every: float = 600.0, log: Callable[[str], None] = print, name: str = "") -> Path:
    """Train until the clock reaches ``max(budgets)`` seconds, resuming from ``run_dir/last.pt``.

    ``batches(step)`` yields batches from step ``step`` on; at each budget mark b the EMA weights are exported to
    ``run_dir/at_<b>s.safetensors``; ``last.pt`` is written every ``checkpoint_every`` clock seconds and at the end.
    Returns the last export."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    curriculum = Curriculum(**recipe.curriculum)
    model, noise_fourier = build_denoiser(recipe)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    step, spent = 0, 0.0
    last = run_dir / "last.pt"
    state = resume(last, model, ema, optimizer, device)
    if state is not None:
        generator.set_state(state["generator"])
        step, spent = int(state["step"]), float(state["seconds"])
        if state.get("noise_fourier") is not None:
            noise_fourier = state["noise_fourier"]
        log(f"resumed {last} at step {step}, {spent:.0f} {clock} s")
    noise_fourier = None if noise_fourier is None else noise_fourier.to(device)
    params = list(model.parameters())
    log(f"{name}: {sum(p.numel() for p in params) / 1e6:.2f} M parameters, budgets {budgets} {clock} s")

    def save() -> None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state(), "step": step, "seconds": timer(),
                 "noise_fourier": noise_fourier, "recipe": json.dumps(asdict(recipe))}
        write_atomic(last, lambda tmp: torch.save(state, tmp))

    def meta(seconds: float) -> dict:
        return {"training": {"experiment": name, "recipe": asdict(recipe), "steps": step, "weights": "ema",
                             "seconds": round(seconds, 1), "clock": clock}}

    timer = Clock(clock, spent)
    marks = sorted(b for b in budgets if b > spent or b == spent == 0)
    next_save, exported = timer() + checkpoint_every, run_dir / "none"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.bf16)
    sums: dict[str, float] = {}
    first_step, logged, started = step, step, time.perf_counter()
    for batch in batches(step):
        now = timer()
        while marks and now >= marks[0]:  # a mark of 0 exports the initial weights
            exported = export(run_dir / f"at_{marks.pop(0):.0f}s.safetensors", ema, noise_fourier, meta(now))
            log(f"exported {exported} at step {step}")
        if now >= next_save or not marks:
            save()
            next_save = now + checkpoint_every
        if not marks:
            break
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup))
        with autocast:
            loss, terms = one_step_loss(model, batch, step, curriculum, decode, lpips, generator, noise_fourier)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        ema_update(ema, model, ema_decay(step, recipe.ema_power))
        step += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if step % 50 == 0:
            rate = (step - first_step) * recipe.batch_size / (time.perf_counter() - started)
            log(f"step {step} {timer():.0f} s {rate:.1f} samples/s " +
                " ".join(f"{k} {v / (step - logged):.4f}" for k, v in sums.items()))  # means since the last line
            sums, logged = {}, step
    return exported
