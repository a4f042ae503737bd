"""LightningModule: train the ×2 latent upscaler with the DenoiserWithVariance objective (SPEC §5).

Per sample i of a batch (all randomness a pure function of (seed, stream position p_i), drawn for the whole batch
on the device by ``latentup.diffusion.densities``, so that results do not depend on how a global batch is split
over ranks, and a resumed run repeats the same draws):

    σ_i ~ sigma_density (lognormal(-0.5, 1.2)),   σ_lr,i ~ lr_noise_density (0 w.p. ½, else U(0, 0.6))
    z_lr ← z_lr + σ_lr ε',   (image_cond, noise_embed) of z_lr, σ_lr, W_lr   (diffusion.conditioning)
    mapping_cond = [noise_embed ‖ pooled text],   caption → "" with probability ``caption_dropout``
    L = mean_i [DenoiserWithVariance(z_hr, ε, σ_i | image_cond, mapping_cond, context) + L_dec,i]

with the optional decoder-space term L_dec (``decoder_loss``, latentup.training.decoder_loss; 0 without).
Word streams (key = mix_seed(seed, tag)): tag 2 → σ, σ_lr, caption drop, ε ‖ ε' (``draws``); 3 / 4 → the
autoencoder's posterior noise of the HR / LR pixels (on-the-fly encoding); 5 → L_dec's windows. The module reads
no value back from the device during a step (no host-device synchronisation), so the host can run ahead of the GPU.

The EMA copy (``model_ema``) is updated after every optimizer step and is what validation samples with and
what gets exported. The autoencoder, the text encoder and L_dec's LPIPS network are frozen helpers kept out of the
checkpoint.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
from torch import Tensor, nn

from latentup.diffusion import densities
from latentup.diffusion.conditioning import NOISE_EMBED_DIM, denoiser_conditioning, pooled_width
from latentup.diffusion.precond import KarrasDenoiser
from latentup.errors import ConfigError
from latentup.evaluation.metrics import build_lpips
from latentup.nn.unet import UNet, UNetConfig
from latentup.seeds import mix_seed
from latentup.training.decoder_loss import DecoderLoss
from latentup.training.ema import ema_decay, ema_update
from latentup.training.validation import Validator

SIGMA_DENSITY = partial(densities.lognormal, mean=-0.5, std=1.2)
LR_NOISE_DENSITY = partial(densities.low_res_sigma, p_zero=0.5, maximum=0.6)


def as_unet_config(config: UNetConfig | dict) -> UNetConfig:
    """A UNetConfig from itself or from a dict of its fields (lists become tuples)."""
    if isinstance(config, UNetConfig):
        return config
    return UNetConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(config).items()})


class UpscalerModule(L.LightningModule):
    """``model`` (the trained denoiser), ``model_ema`` (its EMA), the fixed ``noise_fourier`` weights [64, 1]."""

    def __init__(
        self,
        unet: UNetConfig | dict,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        autoencoder: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        *,
        sigma_data: float = 1.0,
        sigma_density: Callable = SIGMA_DENSITY,
        lr_noise_density: Callable = LR_NOISE_DENSITY,
        caption_dropout: float = 0.1,
        clip_skip: int = 1,
        use_context_mask: bool = False,
        encode_sample: bool = True,
        ema_power: float = 2 / 3,
        ema_max_decay: float = 0.9999,
        gradient_checkpointing: bool = False,
        decoder_loss: dict | None = None,
        init_weights: str | None = None,
        seed: int = 0,
        validation: dict | None = None,
        meta: dict | None = None,
    ):
        super().__init__()
        config = as_unet_config(unet)
        self.pooled_dim = pooled_width(config.mapping_cond_dim)
        self.model = KarrasDenoiser(UNet(config), sigma_data)
        self.model.unet.gradient_checkpointing = gradient_checkpointing
        self.register_buffer("noise_fourier", torch.randn(NOISE_EMBED_DIM // 2, 1,
                                                          generator=torch.Generator().manual_seed(seed)) * 2.0)
        if init_weights is not None:
            self._load_initial(init_weights)
        self.model_ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.model_ema.unet.gradient_checkpointing = False
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.ema_step = 0  # host copy of ema_updates (read once per fit): the decay needs no device read
        # frozen helpers: outside the module tree, so neither checkpointed nor wrapped by DDP/FSDP
        object.__setattr__(self, "autoencoder", autoencoder.requires_grad_(False).eval() if autoencoder else None)
        object.__setattr__(self, "text_encoder", text_encoder.requires_grad_(False).eval() if text_encoder else None)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.sigma_density, self.lr_noise_density = sigma_density, lr_noise_density
        self.caption_dropout, self.clip_skip, self.use_context_mask = caption_dropout, clip_skip, use_context_mask
        self.encode_sample, self.seed = encode_sample, seed
        self.ema_power, self.ema_max_decay = ema_power, ema_max_decay
        self.decoder_loss = DecoderLoss(**decoder_loss) if decoder_loss else None
        if self.decoder_loss and autoencoder is None:
            raise ConfigError("decoder_loss needs an autoencoder to decode with: set autoencoder=taesd (or sd_vae)")
        perceptual = self.decoder_loss is not None and self.decoder_loss.perceptual > 0
        object.__setattr__(self, "lpips", build_lpips().net.requires_grad_(False) if perceptual else None)
        self.meta = dict(meta or {})
        self.validator = Validator(**(validation or {}))
        self.empty_prompt: dict[str, Tensor] | None = None
        self.text_conditioned = config.cross_attention_dim is not None or self.pooled_dim > 0

    @property
    def unet_config(self) -> UNetConfig:
        return self.model.unet.config

    def _load_initial(self, weights: str) -> None:
        """Start from released / exported weights (any format latentup reads; ``bundled``: the bundled default
        model); the configs must agree."""
        from latentup.pipeline import default_weights
        from latentup.weights.sources import resolve_weights
        from latentup.weights.strict import load_strict

        parts = resolve_weights(default_weights() if weights == "bundled" else weights)
        if parts.unet_config != self.unet_config:
            raise ConfigError(f"init_weights {weights} has U-Net config {parts.unet_config}, the model config says "
                              f"{self.unet_config}: set model.unet to the weights' config")
        load_strict(self.model.unet, parts.unet_state, "U-Net")
        if parts.noise_fourier is not None:
            self.noise_fourier.copy_(parts.noise_fourier.reshape(self.noise_fourier.shape))

    # ---- frozen helpers -------------------------------------------------------------------------------------
    def _helpers_to_device(self) -> None:
        for helper in (self.autoencoder, self.text_encoder, self.lpips):
            if helper is not None:
                helper.to(self.device)
        if self.decoder_loss is not None:  # NHWC convolutions: L_dec 2.3x faster on CPU
            self.autoencoder.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        self._helpers_to_device()
        if self.text_conditioned:
            self.empty_prompt = self._empty_prompt()

    def on_validation_start(self) -> None:
        self._helpers_to_device()

    def _empty_prompt(self) -> dict[str, Tensor]:
        if self.text_encoder is not None:
            with torch.no_grad():
                cond = self.text_encoder.encode([""], clip_skip=self.clip_skip)
            return {"context": cond.context, "pooled": cond.pooled, "mask": cond.mask}
        datamodule = getattr(self.trainer, "datamodule", None)
        stored = datamodule.empty_prompt() if datamodule is not None else None
        if stored is None:
            raise ConfigError("a text-conditioned model needs a text_encoder or shards with precomputed text "
                              "embeddings (prepared with a text encoder)")
        return stored

    # ---- batch -> conditioning ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor, positions: Tensor | None, sample: bool, tag: int) -> Tensor:
        """SD-scaled latent (z - shift)·scale of z = mean + std·ε (``sample``, for a stochastic encoder) or the mean;
        ε from stream ``tag`` at ``positions`` (the global RNG without)."""
        if self.autoencoder is None:
            raise ConfigError("pixel batches need an autoencoder: set autoencoder=taesd (or sd_vae)")

        def noise(shape):
            return densities.standard_normal(mix_seed(self.seed, tag), positions, shape[1:])

        with torch.autocast(self.device.type, enabled=False):
            return self.autoencoder.encode(pixels.float(), sample=sample,
                                           noise=None if positions is None else noise).float()

    def latents(self, batch: dict, positions: Tensor | None = None, sample: bool = True) -> tuple[Tensor, Tensor]:
        """(HR latent, LR latent): stored in the batch, or encoded from its pixels."""
        if "hr" in batch:
            return batch["hr"].float(), batch["lr"].float()
        return (self.encode_pixels(batch["hr_pixels"], positions, sample, tag=3),
                self.encode_pixels(batch["lr_pixels"], positions, sample, tag=4))

    def text(self, batch: dict, drop: Tensor) -> dict[str, Tensor] | None:
        """Context / pooled / mask for the batch (precomputed, or encoded from its captions), rows with ``drop``
        replaced by the empty prompt; without either, every row gets the empty prompt."""
        if not self.text_conditioned:
            return None
        empty = self.empty_prompt if self.empty_prompt is not None else self._empty_prompt()
        if "context" in batch:
            cond = {k: batch[k] for k in ("context", "pooled", "mask")}
        elif self.text_encoder is not None:
            captions = list(batch.get("caption", [""] * len(drop)))
            with torch.no_grad():
                encoded = self.text_encoder.encode(captions, clip_skip=self.clip_skip)
            cond = {"context": encoded.context, "pooled": encoded.pooled, "mask": encoded.mask}
        else:
            return {k: v.to(self.device).expand(len(drop), *v.shape[1:]) for k, v in empty.items()}
        keep = ~drop.to(self.device)
        return {k: torch.where(keep.view(-1, *[1] * (v.ndim - 1)), v.to(self.device), empty[k].to(self.device, v.dtype))
                for k, v in cond.items()}

    def conditioning(self, low_res: Tensor, sigma_lr: Tensor, text: dict | None,
                     lr_noise: Tensor | None = None) -> dict[str, Tensor | None]:
        """Keyword arguments of the denoiser for a low-res latent (augmented with ``lr_noise`` when given)."""
        text, cross = text or {}, self.unet_config.cross_attention_dim is not None
        return denoiser_conditioning(
            low_res, sigma_lr, self.noise_fourier, self.unet_config.mapping_cond_dim, lr_noise=lr_noise,
            pooled=text.get("pooled") if self.pooled_dim else None,
            context=text["context"].float() if cross and text else None,
            context_mask=text.get("mask") if cross and self.use_context_mask else None)

    def draws(self, positions: Tensor, hr_shape, lr_shape) -> dict[str, Tensor]:
        """The batch's random draws, on the positions' device; row i depends only on (seed, positions[i]).

        One word stream: the uniform pairs of words 0, 1, 2 give σ, σ_lr and the caption drop, the following words
        the normals ε ‖ ε' (Box–Muller)."""
        n_hr, n_lr = math.prod(hr_shape), math.prod(lr_shape)
        words = densities.random_words(mix_seed(self.seed, 2), positions, 3 + (n_hr + n_lr + 1) // 2)
        u = densities.uniform_pairs(words)
        noise = densities.box_muller(u[:, 3:]).flatten(1)
        return {"sigma": self.sigma_density(u[:, 0]), "sigma_lr": self.lr_noise_density(u[:, 1]),
                "drop": u[:, 2, 0] < self.caption_dropout, "noise": noise[:, :n_hr].reshape(-1, *hr_shape),
                "lr_noise": noise[:, n_hr:n_hr + n_lr].reshape(-1, *lr_shape)}

    # ---- training ---------------------------------------------------------------------------------------------
    def forward_loss(self, batch: dict) -> Tensor:
        """Per-sample training losses [B]."""
        positions = batch["position"].to(self.device)
        hr, lr = self.latents(batch, positions, self.encode_sample)
        d = self.draws(positions, hr.shape[1:], lr.shape[1:])
        cond = self.conditioning(lr, d["sigma_lr"], self.text(batch, d["drop"]), d["lr_noise"])
        if self.decoder_loss is None:
            return self.model.loss(hr, d["noise"], d["sigma"], **cond)
        loss, denoised = self.model.loss_and_denoised(hr, d["noise"], d["sigma"], **cond)
        corners = densities.uniform_pairs(densities.random_words(mix_seed(self.seed, 5), positions, 1))[:, 0]
        return loss + self.decoder_loss(self.autoencoder.decode, denoised, hr, positions, corners, self.lpips_distance,
                                        batch.get("hr_pixels"))

    def lpips_distance(self, image: Tensor, reference: Tensor) -> Tensor:
        """LPIPS-alex per image pair [k], images in [0, 1] (differentiable in ``image``)."""
        return self.lpips(image, reference, normalize=True).reshape(-1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.forward_loss(batch).mean()
        # the mean over ranks by all_gather: self.log(sync_dist=True) would add a barrier, i.e. a device sync, per step
        self.log("train/loss", self.all_gather(loss.detach()).mean(), prog_bar=True,
                 batch_size=len(batch["position"]))
        return loss

    def on_train_start(self) -> None:
        self.ema_step = int(self.ema_updates)  # after a checkpoint restore

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        """θ_ema ← decay(t) θ_ema + (1 - decay(t)) θ for the t-th update, t counted on the host."""
        ema_update(self.model_ema, self.model, ema_decay(self.ema_step, self.ema_power, max_decay=self.ema_max_decay))
        self.ema_updates += 1
        self.ema_step += 1

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ConfigError("no optimizer configured: add an optim config (e.g. optim=adamw_inverse)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ---- validation -------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.validator.step(self, batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.validator.epoch_end(self)

    # ---- checkpoint ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["latentup"] = {"unet_config": asdict(self.unet_config), "meta": self.meta}
