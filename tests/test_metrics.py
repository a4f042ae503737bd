"""Metrics against hand computations; the offline LPIPS backbone loader."""

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
import torchvision
from safetensors.torch import load_file
from torchvision.transforms.functional import gaussian_blur

from conftest import SHARED
from latentup.errors import InputError, WeightsNotFoundError
from latentup.evaluation.metrics import (ImageMetrics, build_lpips, crop_border, find_lpips_backbone, psnr,
                                         rgb_to_y, ssim)
from latentup.evaluation.protocol import load_pair


def test_y_conversion_by_hand():
    colours = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 0.75]]).view(6, 3, 1, 1)
    expected = [16, 235, 81.481, 144.553, 40.966, 16 + 0.5 * 65.481 + 0.25 * 128.553 + 0.75 * 24.966]
    assert torch.allclose(rgb_to_y(colours.double()).flatten(), torch.tensor(expected, dtype=torch.float64))


def test_border_crop():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert crop_border(x, 2).flatten().tolist() == [14, 15, 20, 21]
    assert crop_border(x, 0) is x


def test_psnr_by_hand():
    target = torch.zeros(1, 3, 6, 6)  # tolerances 1e-5 dB: torchmetrics takes log(255) in float32
    pred = torch.full_like(target, 0.1, dtype=torch.float64)  # RGB error 25.5: MSE 650.25, PSNR 10 log10(100) = 20
    assert psnr(pred, target, border=2).item() == pytest.approx(20.0, abs=1e-5)
    y_error = 0.1 * (65.481 + 128.553 + 24.966)
    assert psnr(pred, target, y=True).item() == pytest.approx(10 * math.log10(255**2 / y_error**2), abs=1e-5)
    edges = target.clone()
    edges[..., 0, :] = 1.0  # an error only inside the 2-px border does not count
    edges[:, 0, 2, 2] = 1.0  # one wrong channel-pixel of the 2x2x3 kept: MSE = 255^2 / 12
    assert psnr(edges, target).item() == pytest.approx(10 * math.log10(12), abs=1e-5)
    assert psnr(pred, target).dtype == torch.float64


def _ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Gaussian-window SSIM (11x11, sigma 1.5), data range 255, averaged over all H x W window centres of the
    5-px reflect-padded images (torchmetrics' convention, which the ANCHORS numbers follow)."""
    x, y = np.pad(x, 5, mode="reflect"), np.pad(y, 5, mode="reflect")
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cov = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2, (w * a * b).sum() - ma * mb
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_by_hand():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 17, 18, generator=g)
    pred = (target + 0.2 * torch.rand(2, 3, 17, 18, generator=g) - 0.1).clamp(0, 1)
    weights = np.array([65.481, 128.553, 24.966])
    for k in range(2):
        p, t = pred[k].double().numpy(), target[k].double().numpy()
        py, ty = 16 + np.tensordot(weights, p, 1), 16 + np.tensordot(weights, t, 1)
        expected_y = _ssim_by_hand(py[2:-2, 2:-2], ty[2:-2, 2:-2])
        expected_rgb = np.mean([_ssim_by_hand(255 * p[c, 2:-2, 2:-2], 255 * t[c, 2:-2, 2:-2]) for c in range(3)])
        assert ssim(pred, target, y=True)[k].item() == pytest.approx(expected_y, abs=1e-12)
        assert ssim(pred, target, y=False)[k].item() == pytest.approx(expected_rgb, abs=1e-12)
    assert torch.allclose(ssim(target, target), torch.ones(2, dtype=torch.float64))


@pytest.fixture(scope="module")
def metrics() -> ImageMetrics:
    return ImageMetrics()


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    hr, _ = load_pair(SHARED / "datasets" / "eval" / "Set5" / "head.png")
    return hr[None, :, :128, 64:192]


def test_lpips_identity_and_blur(metrics, photo):
    assert metrics(photo, photo)["lpips"].item() == 0.0
    scores = [metrics(gaussian_blur(photo, 25, sigma), photo)["lpips"].item() for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert 0.005 < scores[0] < 0.1 and 0.2 < scores[-1] < 0.7, scores


def _lpips_by_hand(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 (Zhang et al. 2018) on torchvision's AlexNet with the stored features and the v0.1 lin heads:
    [0, 1] -> 2v - 1 -> (v - shift) / scale; per ReLU 1-5 unit-normalise channels, square the difference, weight
    the channels (1x1 lin), average over space; sum over the layers."""
    features = torchvision.models.alexnet().features.eval()
    file = load_file(str(SHARED / "weights" / "lpips" / "alexnet_features.safetensors"))
    features.load_state_dict({k.removeprefix("features."): v for k, v in file.items()})
    heads = torch.load(Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "alex.pth",
                       map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    a, b = [((2 * v - 1) - shift) / scale for v in (x, y)]
    lins = iter(heads[f"lin{k}.model.1.weight"] for k in range(5))
    total = torch.zeros(x.shape[0])
    with torch.no_grad():
        for i, layer in enumerate(features):
            a, b = layer(a), layer(b)
            if i in (1, 4, 7, 9, 11):
                unit_a, unit_b = [f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in (a, b)]
                total += F.conv2d((unit_a - unit_b) ** 2, next(lins)).mean((1, 2, 3))
    return total


def test_lpips_equals_the_published_formula(metrics, photo):
    blurred = gaussian_blur(photo, 25, 1.0)
    expected = _lpips_by_hand(blurred, photo).item()  # 0.20941; without the 2v - 1 mapping it would be 0.19242
    assert metrics(blurred, photo)["lpips"].item() == pytest.approx(expected, rel=1e-5)


def test_image_metrics_batch(metrics, photo):
    noisy = (photo + 0.05 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    pair = metrics(torch.cat([photo, noisy]), torch.cat([photo, photo]))
    assert set(pair) == set(metrics.names) and all(v.shape == (2,) and v.dtype == torch.float64 for v in pair.values())
    alone = metrics(noisy, photo)
    assert all(pair[k][1].item() == pytest.approx(alone[k].item(), rel=1e-5) for k in pair)
    assert pair["psnr_y"][0] == math.inf and pair["ssim_y"][0].item() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(InputError):
        metrics(photo, photo[..., :64])
    assert "lpips" not in ImageMetrics(lpips=False)(noisy, photo)


def test_backbone_weights_equal_the_file(metrics):
    file = load_file(str(SHARED / "weights" / "lpips" / "alexnet_features.safetensors"))
    loaded = {k.split(".", 1)[1]: v for k, v in metrics.lpips.net.net.state_dict().items()}
    assert set(loaded) == {k.removeprefix("features.") for k in file} and len(file) == 10
    assert all(torch.equal(loaded[k.removeprefix("features.")], v.float()) for k, v in file.items())


def test_torchvision_cache_fallback_without_network(tmp_path, monkeypatch):
    features = load_file(str(SHARED / "weights" / "lpips" / "alexnet_features.safetensors"))
    monkeypatch.delenv("LATENTUP_WEIGHTS")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(OSError("network used")))
    with pytest.raises(WeightsNotFoundError, match="lpips=false"):
        find_lpips_backbone()
    g = torch.Generator().manual_seed(0)
    state = {k: v + torch.randn(v.shape, generator=g) for k, v in features.items()}  # distinct from the file
    state["classifier.1.weight"] = torch.zeros(4, 9216)  # a full torchvision checkpoint also has the classifier
    cached = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert find_lpips_backbone() == cached
    metric = build_lpips()
    assert torch.equal(metric.net.net.slice5.state_dict()["10.weight"], state["features.10.weight"])


def test_missing_explicit_backbone(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="lpips=false"):
        ImageMetrics(lpips_backbone=tmp_path / "nothing.safetensors")
