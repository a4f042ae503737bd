"""The fast loading path (issue 23): ``build_strict`` builds without initialising and assigns the given tensors, with
the same result, the same dtypes and the same one-line errors as ``load_strict`` into a freshly built module."""

import dataclasses

import pytest
import torch
from torch import nn

from latentup.errors import WeightsMismatchError
from latentup.nn.unet import UNet, UNetConfig
from latentup.weights.strict import build_strict, expected_shapes, is_finite, load_strict

CONFIG = UNetConfig(channels=(32, 32, 64), depths=(1, 1, 1), self_attn=(False, False, True),
                    cross_attn=(False, False, True), cross_attention_dim=24, head_dim=32, mapping_dim=64,
                    mapping_cond_dim=0)


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in UNet(CONFIG).state_dict().items()}


def _assert_same(a: nn.Module, b: nn.Module):
    """Equal parameters and buffers (non-persistent ones included), with equal dtypes and layouts."""
    for (name, x), (other, y) in zip([*a.named_parameters(), *a.named_buffers()],
                                     [*b.named_parameters(), *b.named_buffers()], strict=True):
        assert name == other and x.dtype == y.dtype and x.is_contiguous() == y.is_contiguous(), name
        assert torch.equal(x, y), name


@pytest.mark.parametrize("given", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_build_strict_equals_load_strict_then_to(state, given, dtype):
    weights = {k: v.to(given) for k, v in state.items()}
    reference = load_strict(UNet(CONFIG), weights, "U-Net")
    built = build_strict(lambda: UNet(CONFIG), weights, "U-Net", dtype)
    if dtype is not None:
        reference, built = reference.to(dtype), built.to(dtype)
    _assert_same(built, reference)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(built.parameters(), reference.parameters()))


def test_build_strict_skips_the_random_initialisation():
    generator_state = torch.random.get_rng_state()
    linear = build_strict(lambda: nn.Linear(4, 3), {"weight": torch.ones(3, 4), "bias": torch.zeros(3)})
    assert torch.equal(torch.random.get_rng_state(), generator_state)  # nn.init drew nothing
    assert isinstance(linear.weight, nn.Parameter) and torch.equal(linear.weight, torch.ones(3, 4))


@pytest.mark.parametrize(("weights", "message"), [
    ({"weight": torch.ones(3, 4)}, r"^model weights do not fit the model config \(missing 1: bias\)"),
    ({"weight": torch.ones(4, 4), "bias": torch.zeros(3)}, r"shape mismatch 1: weight \(4, 4\) != \(3, 4\)"),
    ({"weight": torch.ones(3, 4), "bias": torch.tensor([0.0, float("inf"), 0.0]).half()},
     r"^model weights hold NaN or infinite values in 1 tensors \(bias\)"),
])
def test_build_strict_errors_are_load_strict_errors(weights, message):
    with pytest.raises(WeightsMismatchError, match=message) as built:
        build_strict(lambda: nn.Linear(4, 3), weights)
    with pytest.raises(WeightsMismatchError) as loaded:
        load_strict(nn.Linear(4, 3), weights)
    assert str(built.value) == str(loaded.value) and "\n" not in str(built.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_is_finite_finds_any_non_finite_value(dtype):
    generator = torch.Generator().manual_seed(0)
    assert is_finite(torch.empty(0, dtype=dtype)) and is_finite(torch.randn(1000, generator=generator).to(dtype))
    for size in (1, 17, 1000, 4099):
        for value in (float("nan"), float("inf"), float("-inf")):
            for position in {0, size // 2, size - 1}:
                x = torch.randn(size, generator=generator).to(dtype)
                x[position] = value
                assert not is_finite(x) and not is_finite(x.view(1, -1)[:, ::1])


def test_expected_shapes_allocate_nothing():
    huge = UNetConfig(channels=(2**16, 2**16), depths=(1, 1), self_attn=(False, False), cross_attn=(False, False),
                      cross_attention_dim=None, head_dim=64, mapping_dim=2**16, mapping_cond_dim=0)
    shapes = expected_shapes(lambda: UNet(huge))  # 10^10 parameters on the meta device
    assert shapes["conv_out.weight"] == (huge.out_channels, 2**16, 1, 1)
    small = dataclasses.replace(huge, channels=(32, 32), head_dim=32, mapping_dim=64)
    assert shapes.keys() == UNet(small).state_dict().keys()
