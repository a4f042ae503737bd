"""Decoder-space loss: the denoiser's x0 judged by the image the autoencoder decodes from it.

The denoising loss alone makes D(x; σ) the latent posterior mean. At high σ that is a blurred latent, and a
nonlinear decoder (TAESD's) turns it into a worse image than the bicubic of the decoded low-res input, although its
latent error is far smaller (docs/training.md). This term scores the decoded image instead, on a window of
``window`` × ``window`` latent px of one sample in ``every`` (those whose stream position p_i ≡ 0 mod ``every``:
decoding is the costly part, and the choice does not depend on how a batch is split over ranks):

    L_dec,i = weight · mean_CHW (dec(D_i[W_i]) − R_i)²    (images in [0, 1]; 0 for the others)
              + perceptual · LPIPS(dec(D_i[W_i]), R_i)   (optional: a sharp x0 instead of a blurred one)

with the window W_i placed by two uniforms of sample i (its own random stream), and the reference R_i either
dec(z_hr,i[W_i]) (``reference="decoded"``) or the true HR image under the window (``"pixels"``). decode(encode(HR))
is not the decodable image closest to HR (on B100 crops, latents found by gradient descent decode 3–4 dB closer),
so the second trains toward what evaluation measures.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from latentup.errors import ConfigError


@dataclass(frozen=True)
class DecoderLoss:
    """L_dec above; ``__call__`` returns it per sample."""

    weight: float = 100.0
    window: int = 16   # latent px (8 image px each)
    every: int = 4     # score the samples at stream positions 0, every, 2·every, ...
    perceptual: float = 0.0  # weight of the LPIPS term (0: none)
    reference: str = "decoded"  # decoded: dec(z_hr[W]) | pixels: the HR image (needs it in the batch)

    def __post_init__(self):
        for name in ("weight", "window", "every"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"decoder_loss.{name} must be > 0, got {getattr(self, name)}")
        if not self.perceptual >= 0:
            raise ConfigError(f"decoder_loss.perceptual must be >= 0, got {self.perceptual}")
        if self.reference not in ("decoded", "pixels"):
            raise ConfigError(f"decoder_loss.reference must be decoded or pixels, got {self.reference!r}")

    def __call__(self, decode: Callable[[Tensor], Tensor], denoised: Tensor, target: Tensor, positions: Tensor,
                 u: Tensor, distance: Callable[[Tensor, Tensor], Tensor] | None = None,
                 pixels: Tensor | None = None) -> Tensor:
        """Per-sample loss [B] of ``denoised`` against ``target`` latents [B, C, H, W] at stream ``positions`` [B],
        ``u`` [B, 2] uniforms. Scores max(1, ⌊B / every⌋) samples, those at positions ≡ 0 mod ``every`` first: all
        of them for consecutive positions and B a multiple of ``every`` (chosen on the device, without a sync).
        ``distance`` (two image batches in [0, 1] → [k]; LPIPS) is needed when ``perceptual`` > 0, ``pixels``
        (the HR images [B, 3, fH, fW], in [0, 1] or uint8) when ``reference`` is pixels."""
        k = max(1, len(denoised) // self.every)
        chosen = torch.argsort((positions % self.every != 0).int(), stable=True)[:k]
        sides = [min(self.window, n) for n in denoised.shape[-2:]]
        slack = torch.tensor([n - side + 1 for n, side in zip(denoised.shape[-2:], sides)], device=u.device)
        corner = (u[chosen] * slack).long()              # [k, 2] top-left corners

        def windows(x: Tensor, scale: int = 1) -> Tensor:  # the windows of latents, or (scale f) of their images
            rows = (corner[:, 0, None] * scale + torch.arange(sides[0] * scale, device=u.device))[:, None, :, None]
            cols = (corner[:, 1, None] * scale + torch.arange(sides[1] * scale, device=u.device))[:, None, None, :]
            channel = torch.arange(x.shape[1], device=u.device)[None, :, None, None]
            return x[chosen[:, None, None, None], channel, rows, cols].contiguous(memory_format=torch.channels_last)

        if self.reference == "pixels":
            if pixels is None:
                raise ConfigError("decoder_loss.reference=pixels needs the HR images in the batch: prepare the "
                                  "shards with data.prepare.settings.pixels=true (or train on an image folder)")
            reference = windows(pixels, pixels.shape[-1] // denoised.shape[-1]).float()
            if pixels.dtype == torch.uint8:
                reference = reference / 255
        else:
            with torch.no_grad():
                reference = decode(windows(target)).float()
        image = decode(windows(denoised)).float()
        error = self.weight * (image - reference).pow(2).flatten(1).mean(1)
        if self.perceptual:
            error = error + self.perceptual * distance(image, reference)
        return torch.zeros(len(denoised), device=error.device).index_put((chosen,), error)
