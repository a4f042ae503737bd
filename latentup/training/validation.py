"""Validation on a fixed set: a few-step sample with the EMA model, scored in pixel space against the HR image
next to the latent-bicubic baseline (decode(bicubic ×2 of the LR latent)), plus comparison grids.

Per image k (fixed seeds, so successive validations are comparable):

    x_0 ~ N(0, σ_max² I) seeded by (seed, k),   ẑ = sampler(D_ema, x_0, σ-grid),   pred = decode(ẑ)
    val/psnr = PSNR-RGB(pred, HR) (2-px border),   val/lpips = LPIPS-alex(pred, HR),
    val/loss = L(σ = e^-0.5) with the same noise
"""

from collections import defaultdict

import numpy as np
import torch

from latentup.atomic import write_atomic
from latentup.diffusion.sampling import sample
from latentup.diffusion.schedules import make_sigmas
from latentup.evaluation.grids import comparison_grid
from latentup.evaluation.metrics import ImageMetrics
from latentup.evaluation.protocol import bicubic2x
from latentup.seeds import mix_seed
from latentup.settings import Settings
from latentup.training.folders import log_dir


class Validator:
    """Accumulates per-image scores over a validation epoch and logs their means (rank 0 writes grids)."""

    def __init__(self, steps: int = 8, sampler: str = "euler", schedule: str = "log_linear",
                 sampler_options: dict | None = None, grid_images: int = 4, lpips: bool = True, seed: int = 0,
                 loss_sigma: float = 0.6065):
        """The sampling knobs (steps, sampler, schedule, sampler_options) as ``latentup.settings.Settings`` checks
        them (configs/sampling/)."""
        self.settings = Settings(steps=steps, sampler=sampler, schedule=schedule,
                                 sampler_options=dict(sampler_options or {})).validate()
        self.grid_images, self.lpips, self.seed, self.loss_sigma = grid_images, lpips, seed, loss_sigma
        self.metrics: ImageMetrics | None = None
        self.baseline: dict[int, dict[str, float]] = {}  # per image: scores of latent-bicubic (fixed)
        self.baseline_pictures: dict[int, torch.Tensor] = {}
        self.scores: dict[str, list[float]] = defaultdict(list)

    def _metrics(self, device) -> ImageMetrics:
        if self.metrics is None:
            self.metrics = ImageMetrics(lpips=self.lpips)
        return self.metrics.to(device)

    @torch.no_grad()
    def sample(self, module, lr: torch.Tensor, cond: dict, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(EMA sample [B, C, 2h, 2w], the initial unit noise), seeded per image index."""
        s = self.settings
        shape = (lr.shape[1], 2 * lr.shape[2], 2 * lr.shape[3])
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(self.seed, i)))
                             for i in indices]).to(lr.device)
        out = sample(module.model_ema, noise, make_sigmas(s.schedule, s.steps).to(lr.device), cond, sampler=s.sampler,
                     sampler_options=s.sampler_options, fresh_noise=torch.randn_like)
        return out, noise

    @torch.no_grad()
    def baseline_scores(self, module, lr: torch.Tensor, hr_px: torch.Tensor, indices: list[int], metrics) -> None:
        """Score decode(bicubic ×2 of the LR latent) once per image; keep the pictures of the grid images."""
        missing = [j for j, i in enumerate(indices) if i not in self.baseline]
        if not missing:
            return
        pictures = module.autoencoder.decode(bicubic2x(lr[missing].float()))
        scores = metrics(pictures, hr_px[missing])
        for n, j in enumerate(missing):
            self.baseline[indices[j]] = {k: float(v[n]) for k, v in scores.items()}
            if indices[j] < self.grid_images:
                self.baseline_pictures[indices[j]] = pictures[n].cpu()

    @torch.no_grad()
    def step(self, module, batch: dict, batch_idx: int) -> None:
        device, indices = module.device, [int(i) for i in batch["index"]]
        hr_px = batch["hr_pixels"].float()
        hr, lr = module.latents(batch, sample=False)
        zeros = torch.zeros(len(indices), device=device)
        cond = module.conditioning(lr, zeros, module.text(batch, zeros.bool()))
        sample, noise = self.sample(module, lr, cond, indices)
        loss = module.model_ema.loss(hr, noise, torch.full_like(zeros, self.loss_sigma), **cond)
        metrics = self._metrics(device)
        with torch.autocast(device.type, enabled=False):
            pred = module.autoencoder.decode(sample.float())
            scores = metrics(pred, hr_px)
            self.baseline_scores(module, lr, hr_px, indices, metrics)
        for j, i in enumerate(indices):
            self.scores["loss"].append(float(loss[j]))
            for name in ("psnr_rgb", "psnr_y", "lpips"):
                if name in scores:
                    self.scores[name].append(float(scores[name][j]))
                    self.scores[f"{name}_latent_bicubic"].append(self.baseline[i][name])
            if i < self.grid_images and module.global_rank == 0:
                rows = {"latent-bicubic": self.baseline_pictures[i], "model": pred[j].cpu()}
                grid = comparison_grid(batch["lr_pixels"][j].cpu(), rows, hr_px[j].cpu())
                self.log_grid(module, grid, i)

    @staticmethod
    def log_grid(module, grid, index: int) -> None:
        """PNG under ``<log dir>/val_grids/``, and an image in every logger that takes images (TensorBoard)."""
        path = log_dir(module.trainer) / "val_grids" / f"step{module.global_step:07d}_{index:03d}.png"
        write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
        for logger in module.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image(f"val/grid_{index}", np.asarray(grid), module.global_step, dataformats="HWC")

    def epoch_end(self, module) -> dict[str, float]:
        means = {f"val/{name.replace('_rgb', '')}": sum(v) / len(v) for name, v in self.scores.items() if v}
        self.scores.clear()
        if means:
            module.log_dict(means, sync_dist=False)
        return means
