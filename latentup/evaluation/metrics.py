"""Per-image full-reference metrics: PSNR and SSIM on RGB and on Y (BT.601), and LPIPS-AlexNet.

All inputs are float [B, 3, H, W] RGB in [0, 1]; every metric returns one value per image ([B], float64, CPU).

    Y     = 16 + 65.481 R + 128.553 G + 24.966 B                  (BT.601, RGB in [0, 1], Y in 0..255)
    PSNR  = 10 log10(255^2 / mean((x - y)^2))                       over C x H x W, after a border crop
    SSIM  = mean over all H x W pixels of (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))
            with an 11x11 Gaussian window (sigma 1.5) over the 5-px reflect-padded image (torchmetrics),
            C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2; SSIM-RGB = mean over channels
    LPIPS = sum_l mean_hw || w_l * (phi_l(2x - 1) - phi_l(2y - 1)) ||^2   (v0.1 heads, unit-normalised AlexNet features)

PSNR and SSIM run in float64 on the 0..255 scale with a ``border``-pixel crop; LPIPS sees the full, uncropped image.
The LPIPS backbone is read from a local file; nothing is ever downloaded (see :func:`build_lpips`).
"""

from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torchmetrics.image.lpip
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.image.lpips import _NoTrainLpips
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from latentup.errors import InputError, WeightsMismatchError, WeightsNotFoundError
from latentup.weights.files import read_state_dict
from latentup.weights.locate import WEIGHTS_ENV, find_file
from latentup.weights.strict import load_strict

LPIPS_BACKBONE = "lpips/alexnet_features.safetensors"
TORCHVISION_ALEXNET = "alexnet-owt-7be5be79.pth"
BT601 = (65.481, 128.553, 24.966)
METRICS = ("psnr_y", "psnr_rgb", "ssim_y", "ssim_rgb", "lpips")


def rgb_to_y(image01: Tensor) -> Tensor:
    """BT.601 luma on the 0..255 scale: [B, 3, H, W] in [0, 1] -> [B, 1, H, W] in [16, 235]."""
    weights = torch.tensor(BT601, dtype=image01.dtype, device=image01.device).view(1, 3, 1, 1)
    return 16.0 + (image01 * weights).sum(dim=1, keepdim=True)


def crop_border(x: Tensor, border: int) -> Tensor:
    """Drop ``border`` pixels on every side."""
    return x[..., border : x.shape[-2] - border, border : x.shape[-1] - border] if border > 0 else x


def _scaled(image01: Tensor, y: bool, border: int) -> Tensor:
    """float64 RGB x 255 or Y (0..255), border-cropped."""
    x = image01.detach().double()
    return crop_border(rgb_to_y(x) if y else x * 255.0, border)


def psnr(pred: Tensor, target: Tensor, y: bool = False, border: int = 2) -> Tensor:
    """Per-image PSNR (dB) on RGB or Y, data range 255."""
    a, b = _scaled(pred, y, border), _scaled(target, y, border)
    return peak_signal_noise_ratio(a, b, data_range=255.0, reduction="none", dim=(1, 2, 3)).cpu()


def ssim(pred: Tensor, target: Tensor, y: bool = True, border: int = 2) -> Tensor:
    """Per-image SSIM on Y or RGB (channel mean), Gaussian 11x11 window, sigma 1.5, data range 255."""
    a, b = _scaled(pred, y, border), _scaled(target, y, border)
    return structural_similarity_index_measure(a, b, gaussian_kernel=True, kernel_size=11, sigma=1.5,
                                               data_range=255.0, reduction="none").cpu()


def find_lpips_backbone(path: str | Path | None = None) -> Path:
    """The AlexNet feature weights: ``path``, else ``$LATENTUP_WEIGHTS/lpips/alexnet_features.safetensors``,
    else torchvision's cached ImageNet AlexNet (``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"LPIPS backbone {path} does not exist: check lpips_backbone or set lpips=false")
        return path
    try:
        return find_file(LPIPS_BACKBONE)
    except WeightsNotFoundError:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET
        if cached.is_file():
            return cached
    raise WeightsNotFoundError(
        f"LPIPS AlexNet backbone not found: put alexnet_features.safetensors at ${WEIGHTS_ENV}/lpips/, "
        f"or torchvision's {TORCHVISION_ALEXNET} in {cached.parent}, pass lpips_backbone=PATH, or set lpips=false"
    )


def read_alexnet_features(path: str | Path) -> dict[str, Tensor]:
    """``features.N.{weight,bias}`` tensors of a backbone file (a full torchvision AlexNet keeps only those)."""
    state = read_state_dict(path)
    return {k: v.float() for k, v in state.items() if k.startswith("features.")}


def load_lpips_backbone(metric: LearnedPerceptualImagePatchSimilarity, features: dict[str, Tensor]) -> None:
    """Load ``features.N.*`` strictly into torchmetrics' AlexNet slices (``sliceK.N.*`` keeps torchvision's N)."""
    if not features:
        raise WeightsMismatchError("the LPIPS backbone file holds no features.N tensors: is it an AlexNet file?")
    backbone = metric.net.net
    by_index = {key.split(".", 1)[1]: key for key in backbone.state_dict()}  # "N.weight" -> "sliceK.N.weight"
    renamed = {by_index.get(k.removeprefix("features."), k): v for k, v in features.items()}
    load_strict(backbone, renamed, what="LPIPS AlexNet")


def build_lpips(backbone: str | Path | None = None) -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics' LPIPS-alex (bundled v0.1 heads) with the backbone from a local file, per-image scores.

    The metric is constructed with ``pnet_rand=True`` (torchvision builds AlexNet with ``weights=None``, so
    nothing is fetched); the real features are then loaded strictly from :func:`find_lpips_backbone`.
    """
    features = read_alexnet_features(find_lpips_backbone(backbone))
    offline = partial(_NoTrainLpips, pnet_rand=True)
    with mock.patch.object(torchmetrics.image.lpip, "_NoTrainLpips", offline):
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True)
    load_lpips_backbone(metric, features)
    return metric.eval()


class ImageMetrics(nn.Module):
    """All per-image metrics of a batch: ``metrics(pred, target) -> {name: [B] float64}`` (names: METRICS).

    ``lpips=False`` skips LPIPS (no backbone needed). Move it with ``.to(device)`` like any module.
    """

    def __init__(self, border: int = 2, lpips: bool = True, lpips_backbone: str | Path | None = None):
        super().__init__()
        self.border = border
        self.lpips = build_lpips(lpips_backbone) if lpips else None

    @property
    def names(self) -> tuple[str, ...]:
        return METRICS if self.lpips is not None else METRICS[:-1]

    @torch.no_grad()
    def forward(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise InputError(f"metrics need two [B, 3, H, W] batches of one shape, got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        out = {
            "psnr_y": psnr(pred, target, y=True, border=self.border),
            "psnr_rgb": psnr(pred, target, y=False, border=self.border),
            "ssim_y": ssim(pred, target, y=True, border=self.border),
            "ssim_rgb": ssim(pred, target, y=False, border=self.border),
        }
        if self.lpips is not None:
            self.lpips.reset()
            scores = self.lpips(pred.float().clamp(0, 1), target.float().clamp(0, 1))
            out["lpips"] = scores.reshape(-1).double().cpu()
        return out
