"""Winograd F(4×4, 3×3) equals the direct 3×3 convolution, is used only where it applies, and follows the weights."""

import pytest
import torch
import torch.nn.functional as F

from latentup.nn import winograd
from latentup.nn.winograd import Conv3x3, transform_filter, winograd_conv3x3


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("batch, c_in, c_out, height, width, chunk", [
    (2, 16, 24, 8, 12, 128), (1, 32, 32, 20, 4, 128), (3, 8, 40, 16, 16, 4), (2, 24, 8, 12, 28, 1),
])
def test_winograd_equals_direct_convolution(monkeypatch, batch, c_in, c_out, height, width, chunk):
    monkeypatch.setattr(winograd, "CHUNK_TILES", chunk)  # one chunk, several, one tile row at a time
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(batch, c_in, height, width, generator=g), torch.randn(c_out, c_in, 3, 3, generator=g), \
        torch.randn(c_out, generator=g)
    for bias in (b, None):
        expected = F.conv2d(x, w, bias, padding=1)
        got = winograd_conv3x3(x, transform_filter(w), bias)
        assert got.shape == expected.shape and got.is_contiguous()
        assert relative_error(got, expected) < 2e-5


def test_winograd_is_exact_in_float64_on_an_analytic_case():
    """A ramp x = i + 2j through the Laplacian kernel gives 0 inside and known border values (zero padding)."""
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(12.0), indexing="ij")
    x = (i + 2 * j).double()[None, None]
    laplace = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64)[None, None]
    got = winograd_conv3x3(x, transform_filter(laplace), None)
    assert torch.allclose(got, F.conv2d(x, laplace, padding=1), atol=1e-11)
    assert got[0, 0, 1:-1, 1:-1].abs().max() < 1e-11


def test_conv3x3_uses_winograd_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)
    conv = Conv3x3(8, 8)
    assert list(conv.state_dict()) == ["weight", "bias"]
    calls = []
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a: calls.append(a[0].shape) or F.conv2d(
        a[0], conv.weight, conv.bias, padding=1))
    x = torch.randn(1, 8, 16, 16)  # 16 tiles: MIN_TILES
    with torch.no_grad():
        conv(x)  # off by default
        conv.winograd = True
        conv(x)
        conv(torch.randn(1, 8, 12, 16))  # 12 tiles: the direct convolution is as fast
        assert conv._filter is not None
        conv(torch.randn(1, 8, 14, 16))  # side not a multiple of 4
        monkeypatch.setattr(winograd, "MIN_CHANNELS", 16)
        conv(x)  # too few channels for Winograd to pay
        monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)
        conv.double()(x.double())  # float64
    conv.float()(x)  # gradients enabled (training)
    assert calls == [x.shape]


def test_filter_is_transformed_only_at_a_call_that_pays(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)
    conv = Conv3x3(8, 8)
    conv.winograd = True
    with torch.no_grad():
        conv(torch.randn(2, 8, 8, 8))  # 8 tiles
        assert conv._filter is None
        conv(torch.randn(2, 8, 12, 12))  # 18 tiles
        assert conv._filter is not None


def test_transform_filter_equals_g_w_gt_in_float64():
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    g = torch.tensor(winograd._G, dtype=torch.float64)
    expected = torch.einsum("ai,kcij,bj->abkc", g, w.double(), g).reshape(36, 5, 3)
    got = transform_filter(w)
    assert got.shape == (36, 5, 3) and got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-6 * expected.abs().max()


def test_conv3x3_follows_in_place_weight_updates():
    conv = Conv3x3(4, 6)
    conv.winograd = True
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(2)  # e.g. an optimizer or EMA step
        after = conv(x)
        assert relative_error(after, F.conv2d(x, conv.weight, conv.bias, padding=1)) < 2e-5
    assert not torch.allclose(before, after)


def test_unet_with_winograd_matches_direct(monkeypatch):
    from latentup.nn.unet import UNet, UNetConfig

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(32, 32, 64), depths=(1, 1, 1), head_dim=16, cross_attention_dim=8,
                           self_attn=(False, False, True), cross_attn=(False, True, True), mapping_dim=64,
                           mapping_cond_dim=12)).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    x, context, mapping = torch.randn(2, 8, 16, 24), torch.randn(2, 5, 8), torch.randn(2, 12)
    with torch.no_grad():
        direct = unet(x, torch.tensor(0.2), mapping, context)
        for module in unet.modules():
            if isinstance(module, Conv3x3):
                module.winograd = True
        fast = unet(x, torch.tensor(0.2), mapping, context)
    transformed = [m._filter is not None for m in unet.modules() if isinstance(m, Conv3x3)]
    assert any(transformed) and not all(transformed)  # level 0 (48 tiles) pays, level 2 (3 tiles) does not
    assert relative_error(fast, direct) < 1e-4
