"""k-diffusion ``image_v1`` checkpoints → latentup: outputs equal k-diffusion's own model and diffusers' import.

k-diffusion 0.0.12's package ``__init__`` imports heavy, unrelated modules (scikit-image, CLIP, wandb), so the test
imports only ``k_diffusion.layers`` and ``k_diffusion.models.image_v1`` under an empty package stub. Install with
``pip install --no-deps k-diffusion==0.0.12 einops``.
"""

import importlib.util
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from latentup.errors import WeightsMismatchError
from latentup.nn.unet import UNet, UNetConfig
from latentup.weights.kdiffusion import kdiffusion_to_latentup, load_kdiffusion_checkpoint
from latentup.weights.strict import load_strict

pytest.importorskip("einops")
if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.0.12)", allow_module_level=True)


def _kdiffusion_modules():
    """(image_v1, layers) without running k_diffusion/__init__.py."""
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(importlib.util.find_spec("k_diffusion").submodule_search_locations)
        sys.modules["k_diffusion"] = package
    from k_diffusion import layers
    from k_diffusion.models import image_v1

    return image_v1, layers


image_v1, kd_layers = _kdiffusion_modules()

# ImageDenoiserModelV1 arguments and the UNetConfig they must import as (SPEC §4.1 at released and toy size).
SMALL = dict(c_in=4, feats_in=128, depths=[1, 2, 1, 1], channels=[64, 64, 128, 128],
             self_attn_depths=[False, False, False, True], cross_attn_depths=[False, True, True, True],
             mapping_cond_dim=40, unet_cond_dim=4, cross_cond_dim=24, has_variance=True)
SMALL_CONFIG = UNetConfig(channels=(64, 64, 128, 128), depths=(1, 2, 1, 1), cross_attention_dim=24, mapping_dim=128,
                          mapping_cond_dim=40)
RELEASED = dict(c_in=4, feats_in=768, depths=[4, 4, 4, 4], channels=[384, 384, 768, 768],
                self_attn_depths=[False, False, False, True], cross_attn_depths=[False, True, True, True],
                mapping_cond_dim=896, unet_cond_dim=4, cross_cond_dim=768, has_variance=True)
TEXT_FREE = dict(c_in=4, feats_in=64, depths=[1, 1, 2], channels=[32, 64, 64], self_attn_depths=[False, True, True],
                 mapping_cond_dim=0, unet_cond_dim=4, cross_cond_dim=0, has_variance=False)
TEXT_FREE_CONFIG = UNetConfig(in_channels=8, out_channels=4, channels=(32, 64, 64), depths=(1, 1, 2),
                              self_attn=(False, True, True), cross_attention_dim=None, mapping_dim=64,
                              mapping_cond_dim=0)


def kdiffusion_model(args: dict, seed=0):
    """A random ImageDenoiserModelV1 (proj_out re-randomised: v0.0.12 zero-inits it) and its checkpoint dict."""
    torch.manual_seed(seed)
    model = image_v1.ImageDenoiserModelV1(**args).eval()
    torch.nn.init.normal_(model.proj_out.weight, std=0.05)
    torch.nn.init.normal_(model.proj_out.bias, std=0.05)
    state = {f"inner_model.{k}": v for k, v in model.state_dict().items()}
    state["low_res_noise_embed.weight"] = kd_layers.FourierFeatures(1, 128, std=2.0).weight
    return model, state


def batch(config: UNetConfig, seed=1, tokens=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 24, generator=g)
    sigma = torch.tensor([0.3, 4.0])
    unet_cond = torch.randn(2, config.in_channels - 4, 16, 24, generator=g)
    mapping_cond = torch.randn(2, config.mapping_cond_dim, generator=g) if config.mapping_cond_dim else None
    context = torch.randn(2, tokens, config.cross_attention_dim, generator=g) if config.cross_attention_dim else None
    keep = torch.arange(tokens)[None] < torch.tensor([[3], [5]])
    return x, sigma, unet_cond, mapping_cond, context, keep


def run_kdiffusion(model, x, sigma, unet_cond, mapping_cond, context, keep):
    """k-diffusion's inner model: its data channels and (if any) the logvar channel as a map-mean [B]."""
    pad = None if context is None else (torch.zeros(context.shape[:2]) if keep is None else (~keep).float())
    with torch.no_grad():
        out = model(x, sigma, mapping_cond=mapping_cond, unet_cond=unet_cond, cross_cond=context,
                    cross_cond_padding=pad, return_variance=model.has_variance)
    return out if model.has_variance else (out, None)


def run_latentup(unet, x, sigma, unet_cond, mapping_cond, context, keep):
    with torch.no_grad():
        return unet(torch.cat([x, unet_cond], 1), sigma.log() / 4, mapping_cond, context, keep)


def check_parity(args, expected_config, label: str) -> None:
    """Convert a random k-diffusion model and compare outputs, without and (if it has text) with padding."""
    model, state = kdiffusion_model(args)
    unet_state, noise_weight = kdiffusion_to_latentup(state)
    assert noise_weight.shape == (64, 1) and torch.equal(noise_weight, state["low_res_noise_embed.weight"])
    unet = load_strict(UNet(expected_config).eval(), unet_state, "U-Net")
    x, sigma, unet_cond, mapping_cond, context, keep = batch(expected_config)
    for mask in (None, keep) if context is not None else (None,):
        data, logvar = run_kdiffusion(model, x, sigma, unet_cond, mapping_cond, context, mask)
        out = run_latentup(unet, x, sigma, unet_cond, mapping_cond, context, mask)
        err = (out[:, : data.shape[1]] - data).abs().max().item()
        print(f"{label} (mask={mask is not None}): max |Δ| data {err:.2e} (scale {data.abs().max():.2f})", end="")
        assert err <= 1e-4 * data.abs().max().item()
        if logvar is not None:
            logvar_err = (out[:, -1].mean((1, 2)) - logvar).abs().max().item()
            print(f", logvar {logvar_err:.2e}", end="")
            assert logvar_err <= 1e-5
        print()


def test_small_import_matches_kdiffusion():
    check_parity(SMALL, SMALL_CONFIG, "small k-diffusion")


def test_text_free_import_matches_kdiffusion():
    check_parity(TEXT_FREE, TEXT_FREE_CONFIG, "text-free k-diffusion")


@pytest.mark.slow
def test_released_import_matches_kdiffusion():
    check_parity(RELEASED, UNetConfig(), "released k-diffusion")


def test_import_matches_diffusers_import():
    diffusers = pytest.importorskip("diffusers")
    model, state = kdiffusion_model(SMALL)
    unet_state, _ = kdiffusion_to_latentup(state)
    ref = diffusers.UNet2DConditionModel.from_config(SMALL_CONFIG.to_diffusers()).eval()
    ref.load_state_dict(unet_state, strict=True)
    unet = load_strict(UNet(SMALL_CONFIG).eval(), unet_state, "U-Net")
    x, sigma, unet_cond, mapping_cond, context, keep = batch(SMALL_CONFIG)
    net_in = torch.cat([x, unet_cond], 1)
    with torch.no_grad():
        expected = ref(net_in, sigma.log() / 4, context, timestep_cond=mapping_cond,
                       encoder_attention_mask=keep.float()).sample
    got = run_latentup(unet, x, sigma, unet_cond, mapping_cond, context, keep)
    err = (got - expected).abs().max().item()
    print(f"k-diffusion import, ours vs diffusers: max |Δ| {err:.2e}")
    assert err <= 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("layout", ["model_ema", "model", "bare", "safetensors"])
def test_load_checkpoint_file(tmp_path, layout):
    _, state = kdiffusion_model(SMALL)
    if layout == "safetensors":
        path = tmp_path / "upscaler.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "upscaler.pth"
        other = {k: torch.zeros_like(v) for k, v in state.items()}
        torch.save({"model_ema": state, "model": other} if layout == "model_ema" else
                   {"model": state, "step": torch.tensor(470000)} if layout == "model" else state, path)
    config, unet_state, noise_weight = load_kdiffusion_checkpoint(path)
    assert config == SMALL_CONFIG
    expected, expected_noise = kdiffusion_to_latentup(state)
    assert unet_state.keys() == expected.keys() and all(torch.equal(unet_state[k], expected[k]) for k in expected)
    assert torch.equal(noise_weight, expected_noise)


def test_released_layout_counts():
    with torch.device("meta"):
        model = image_v1.ImageDenoiserModelV1(**RELEASED)
    state = {f"inner_model.{k}": v for k, v in model.state_dict().items()} | {
        "low_res_noise_embed.weight": torch.empty(64, 1, device="meta")}
    unet_state, _ = kdiffusion_to_latentup(state)
    assert (len(state), len(unet_state)) == (566, 639)
    with torch.device("meta"):
        expected = UNet(UNetConfig()).state_dict()
    assert {k: v.shape for k, v in unet_state.items()} == {k: v.shape for k, v in expected.items()}


def test_bad_checkpoints_name_the_keys(tmp_path):
    _, state = kdiffusion_model(SMALL)
    truncated = {k: v for k, v in state.items() if k != "inner_model.u_net.u_blocks.1.1.kv_proj.bias"}
    torch.save({"model_ema": truncated}, tmp_path / "truncated.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing 2: up_blocks\.1\.attentions\.0\.attn2\.to_k\.bias"):
        load_kdiffusion_checkpoint(tmp_path / "truncated.pth")
    with pytest.raises(WeightsMismatchError, match=r"inner_model\.extra_head\.weight"):
        kdiffusion_to_latentup(state | {"inner_model.extra_head.weight": torch.zeros(1)})
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="cannot read weights"):
        load_kdiffusion_checkpoint(tmp_path / "junk.pth")
