"""The K-block U-Net against diffusers' UNet2DConditionModel on the same random weights (fp32, CPU)."""

import json
import time

import pytest
import torch

from latentup.errors import ConfigError, InputError, WeightsMismatchError
from latentup.nn.unet import UNet, UNetConfig
from latentup.weights.strict import load_strict

RELEASED_PARAMS, RELEASED_TENSORS = 372_560_645, 639


@pytest.fixture(scope="module")
def released_config(spec_dir) -> dict:
    return json.loads((spec_dir / "unet_config.json").read_text())


def shrink(config: dict) -> dict:
    """The released config at toy size: 32/64 channels, 1-2 layers, 8 context dims."""
    return config | {"block_out_channels": [32, 32, 64, 64], "layers_per_block": [1, 2, 1, 1], "attention_head_dim": 16,
                     "cross_attention_dim": 8, "time_cond_proj_dim": 12}


def diffusers_unet(config: dict):
    """diffusers' UNet2DConditionModel with seeded random weights (the test is skipped without diffusers)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel.from_config(config).eval()


def shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def inputs(config: UNetConfig, batch=2, height=16, width=24, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=g)
    c_noise = torch.randn(batch, generator=g)
    mapping_cond = torch.randn(batch, config.mapping_cond_dim, generator=g)
    context = torch.randn(batch, tokens, config.cross_attention_dim or 1, generator=g)
    mask = torch.arange(tokens)[None] < torch.tensor([[3], [tokens]])[:batch]  # sample 0 keeps 3 tokens
    return x, c_noise, mapping_cond, context, mask


def compare(ref, ours: UNet, mask: bool) -> tuple[float, float]:
    """(max |ours - diffusers|, max |diffusers|) on one random batch, with or without the padding mask."""
    x, c_noise, mapping_cond, context, keep = inputs(ours.config)
    keep = keep if mask else None
    with torch.no_grad():
        expected = ref(x, c_noise, context, timestep_cond=mapping_cond,
                       encoder_attention_mask=None if keep is None else keep.float()).sample
        got = ours(x, c_noise, mapping_cond, context, keep)
    return (got - expected).abs().max().item(), expected.abs().max().item()


@pytest.mark.parametrize("mask", [False, True])
def test_small_unet_matches_diffusers(released_config, mask):
    config = shrink(released_config)
    ref = diffusers_unet(config)
    ours = load_strict(UNet(UNetConfig.from_diffusers(config)).eval(), ref.state_dict(), "U-Net")
    err, scale = compare(ref, ours, mask)
    print(f"small U-Net (mask={mask}): max |Δ| {err:.2e}, output scale {scale:.2f}")
    assert err <= 1e-4 * scale


def test_released_unet_matches_diffusers(released_config):
    start = time.perf_counter()
    ref = diffusers_unet(released_config)
    ours = UNet(UNetConfig.from_diffusers(released_config)).eval()
    assert ours.config == UNetConfig()
    state = ref.state_dict()
    assert len(state) == len(ours.state_dict()) == RELEASED_TENSORS
    assert sum(p.numel() for p in ours.parameters()) == RELEASED_PARAMS
    load_strict(ours, state, "U-Net")
    for mask in (False, True):
        err, scale = compare(ref, ours, mask)
        print(f"released U-Net (mask={mask}): max |Δ| {err:.2e}, output scale {scale:.2f}")
        assert err <= 1e-4 * scale
    print(f"released-size parity took {time.perf_counter() - start:.1f} s")


def test_padding_mask_changes_the_output(released_config):
    ours = UNet(UNetConfig.from_diffusers(shrink(released_config))).eval()
    torch.nn.init.normal_(ours.conv_out.weight)  # conv_out starts at zero (k-diffusion init)
    x, c_noise, mapping_cond, context, keep = inputs(ours.config)
    with torch.no_grad():
        masked, unmasked = ours(x, c_noise, mapping_cond, context, keep), ours(x, c_noise, mapping_cond, context)
        assert not torch.allclose(masked[0], unmasked[0], atol=1e-3)  # sample 0 has padding
        torch.testing.assert_close(masked[1], unmasked[1])  # sample 1 keeps every token


def test_config_round_trip(released_config):
    config = UNetConfig.from_diffusers(released_config)
    exported = config.to_diffusers()
    assert {k: v for k, v in released_config.items() if k in exported} == {
        k: v for k, v in exported.items() if k in released_config}
    assert set(released_config) - set(exported) == {"_diffusers_version", "_name_or_path"}
    assert UNetConfig.from_diffusers(exported) == config

    small = UNetConfig.from_diffusers(shrink(released_config))
    assert small.depths == (1, 2, 1, 1) and small.head_dim == 16 and small.mapping_dim == 64
    ref = diffusers_unet(small.to_diffusers())
    assert shapes(ref) == shapes(UNet(small))
    wide = UNetConfig(channels=(32, 64, 96, 96), depths=(1,) * 4, cross_attention_dim=8, head_dim=32, mapping_dim=96,
                      mapping_cond_dim=0)
    assert UNetConfig.from_diffusers(wide.to_diffusers()) == wide
    ref = diffusers_unet(wide.to_diffusers())
    assert shapes(ref) == shapes(UNet(wide))


def test_text_free_and_per_level_attention():
    config = UNetConfig(in_channels=4, out_channels=4, channels=(32, 64, 64), depths=(1, 1, 2),
                        self_attn=(False, True, False), cross_attn=(True, True, True), cross_attention_dim=None,
                        mapping_dim=64, mapping_cond_dim=0)
    assert config.cross_attn == (False, False, False)
    unet = UNet(config).eval()
    keys = set(unet.state_dict())
    assert not any("attn2" in k or "cond_proj" in k for k in keys)
    assert {"down_blocks.1.attentions.0.attn1.to_q.weight", "up_blocks.1.attentions.0.attn1.to_q.weight"} <= keys
    assert not any(k.startswith(("down_blocks.0.attentions", "down_blocks.2.attentions")) for k in keys)
    torch.nn.init.normal_(unet.conv_out.weight)
    out = unet(torch.randn(2, 4, 8, 12), torch.tensor(0.3))
    assert out.shape == (2, 4, 8, 12) and out.abs().max() > 0
    with pytest.raises(ConfigError, match="no diffusers equivalent"):
        config.to_diffusers()


def test_config_errors(released_config):
    with pytest.raises(ConfigError, match="K-block"):
        UNetConfig.from_diffusers({"down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["UpBlock2D"]})
    with pytest.raises(ConfigError, match="one entry per level"):
        UNetConfig(depths=(4, 4, 4))
    with pytest.raises(ConfigError, match="self-attention must be at the deepest level"):
        UNetConfig(self_attn=(False, False, True, True)).to_diffusers()


def test_scalar_c_noise_checkpointing_and_channels_last(released_config):
    config = UNetConfig.from_diffusers(shrink(released_config))
    unet = UNet(config)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # conv_out starts at zero (k-diffusion init)
    x, c_noise, mapping_cond, context, keep = inputs(config)
    with torch.no_grad():
        same_noise = torch.full((2,), 0.25)
        torch.testing.assert_close(unet(x, 0.25, mapping_cond, context), unet(x, same_noise, mapping_cond, context))
        expected = unet(x, c_noise, mapping_cond, context, keep)
        got = unet.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), c_noise,
                                                          mapping_cond, context, keep)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        unet(x, c_noise, mapping_cond, context, keep).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters() if p.requires_grad]

    for plain, checkpointed in zip(grads(False), grads(True)):
        torch.testing.assert_close(checkpointed, plain)


def test_input_size_error():
    unet = UNet(UNetConfig(channels=(32, 32, 64, 64), depths=(1,) * 4, cross_attention_dim=8, mapping_dim=64,
                           mapping_cond_dim=0))
    with pytest.raises(InputError, match="multiples of 8 and at least 16"):
        unet(torch.randn(1, 8, 20, 24), 0.0, context=torch.randn(1, 3, 8))
    with pytest.raises(InputError, match="pass context"):
        unet(torch.randn(1, 8, 16, 16), 0.0)


def test_mismatched_weights_name_the_keys(released_config):
    config = UNetConfig.from_diffusers(shrink(released_config))
    state = UNet(config).state_dict()
    deeper = UNet(UNetConfig.from_diffusers(shrink(released_config) | {"layers_per_block": 2}))
    with pytest.raises(WeightsMismatchError, match=r"missing \d+: down_blocks\.0\.resnets\.1\."):
        load_strict(deeper, state, "U-Net")
    wider = UNet(UNetConfig.from_diffusers(shrink(released_config) | {"cross_attention_dim": 16}))
    with pytest.raises(WeightsMismatchError, match=r"shape mismatch \d+: down_blocks\.1\.attentions\.0\.attn2\.norm_"):
        load_strict(wider, state, "U-Net")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_has_no_host_device_sync(released_config):
    config = UNetConfig.from_diffusers(shrink(released_config))
    unet = UNet(config).cuda().to(memory_format=torch.channels_last)
    x, c_noise, mapping_cond, context, keep = (t.cuda() for t in inputs(config))
    unet(x, c_noise, mapping_cond, context, keep)  # warm-up (lazy CUDA initialisation may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        unet(x, c_noise, mapping_cond, context, keep).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
