"""Loading without random initialisation (issue 23): the CLIP text tower and the KL VAE built by ``build_strict``
equal ``load_strict`` into an initialised module, draw nothing from the random generator, keep their one-line
errors; a meta-device U-Net build (the key list) runs no Python meta kernel, so torch._dynamo is never imported."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from latentup.autoencoders import AutoencoderKL, load_autoencoder
from latentup.autoencoders.kl import KLConfig
from latentup.errors import WeightsMismatchError
from latentup.nn.layers import FourierFeatures, KDownsample2D, KUpsample2D, blur_kernel
from latentup.text import CLIPTextConditioner, TextTowerConfig
from latentup.text.clip import hf_to_open_clip
from latentup.weights.strict import build_strict, load_strict

SMALL_VAE = KLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
SMALL_TEXT = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4)


def _same(a: nn.Module, b: nn.Module):
    """Equal parameters and buffers (non-persistent ones too), dtypes, requires_grad and training mode."""
    assert a.training == b.training
    for (name, x), (other, y) in zip([*a.named_parameters(), *a.named_buffers()],
                                     [*b.named_parameters(), *b.named_buffers()], strict=True):
        assert name == other and x.dtype == y.dtype and x.requires_grad == y.requires_grad, name
        assert torch.equal(x, y), name


def _draws_nothing(load):
    """``load()``, asserting that it leaves the global random generator as it found it (nn.init draws from it)."""
    state = torch.random.get_rng_state()
    module = load()
    assert torch.equal(torch.random.get_rng_state(), state), "the build drew random numbers: something initialised"
    return module


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_encoder")
    torch.manual_seed(0)
    transformers.CLIPTextModel(SMALL_TEXT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(1)
    (folder / "config.json").write_text(json.dumps(SMALL_VAE.to_diffusers()))
    save_file(AutoencoderKL(SMALL_VAE).state_dict(), folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_text_tower_loads_without_init_and_equals_the_initialised_load(text_folder):
    built = _draws_nothing(lambda: CLIPTextConditioner.from_hf(text_folder))
    config = TextTowerConfig.from_hf(json.loads((text_folder / "config.json").read_text()))
    state = hf_to_open_clip(transformers.CLIPTextModel.from_pretrained(text_folder).state_dict())
    reference = load_strict(CLIPTextConditioner(config), state, "CLIP text encoder")
    _same(built, reference)
    assert not built.training and not any(p.requires_grad for p in built.parameters())  # frozen, as __init__ says
    prompts = ["a photo of a cat", ""]
    ours, theirs = built.encode(prompts), reference.encode(prompts)
    assert torch.equal(ours.context, theirs.context) and torch.equal(ours.pooled, theirs.pooled)


def test_text_tower_bad_files_give_one_line_errors(text_folder, tmp_path):
    state = transformers.CLIPTextModel.from_pretrained(text_folder).state_dict()
    (tmp_path / "config.json").write_text((text_folder / "config.json").read_text())
    cases = [
        ({k: v for k, v in state.items() if k != "final_layer_norm.bias"}, r"^CLIP text encoder weights do not "
         r"fit the CLIP text encoder config \(missing 1: ln_final\.bias\); check that the weights and config"),
        ({**state, "encoder.layers.0.mlp.fc1.bias": torch.full((96,), float("nan"))},
         r"^CLIP text encoder weights hold NaN or infinite values in 1 tensors "
         r"\(transformer\.resblocks\.0\.mlp\.c_fc\.bias\): the file is damaged"),
    ]
    for broken, message in cases:
        save_file({k: v.contiguous() for k, v in broken.items()}, tmp_path / "model.safetensors")
        with pytest.raises(WeightsMismatchError, match=message) as error:
            CLIPTextConditioner.from_hf(tmp_path)
        assert "\n" not in str(error.value)


def test_kl_vae_loads_without_init_and_equals_the_initialised_load(vae_folder, tmp_path):
    from safetensors.torch import load_file

    state = load_file(vae_folder / "diffusion_pytorch_model.safetensors")
    reference = load_strict(AutoencoderKL(SMALL_VAE), state, "VAE")
    _same(_draws_nothing(lambda: load_autoencoder(vae_folder)), reference)
    _same(_draws_nothing(lambda: AutoencoderKL.from_diffusers(SMALL_VAE.to_diffusers(), weights=state)), reference)
    save_file(state, tmp_path / "vae.safetensors")
    _same(_draws_nothing(lambda: AutoencoderKL.from_single_file(tmp_path / "vae.safetensors")), reference)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_autoencoder(vae_folder).decode(reference.encode(image, sample=False)),
                           reference.decode(reference.encode(image, sample=False)))


def test_kl_vae_bad_weights_give_one_line_errors(vae_folder, tmp_path):
    from safetensors.torch import load_file

    state = load_file(vae_folder / "diffusion_pytorch_model.safetensors")
    cases = [
        ({**state, "decoder.conv_out.bias": torch.zeros(4)},
         r"^VAE weights do not fit the VAE config \(shape mismatch 1: decoder\.conv_out\.bias \(4,\) != \(3,\)\)"),
        ({**state, "encoder.conv_in.bias": torch.full((32,), float("inf"))},
         r"^VAE weights hold NaN or infinite values in 1 tensors \(encoder\.conv_in\.bias\): the file is damaged"),
    ]
    for broken, message in cases:
        save_file(broken, tmp_path / "vae.safetensors")
        for load in (lambda: AutoencoderKL.from_diffusers(vae_folder / "config.json", tmp_path / "vae.safetensors"),
                     lambda: AutoencoderKL.from_single_file(tmp_path / "vae.safetensors")):
            with pytest.raises(WeightsMismatchError, match=message) as error:
                load()
            assert "\n" not in str(error.value)


def test_build_strict_keeps_requires_grad_false_of_a_frozen_module():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.requires_grad_(False)

    built = build_strict(Frozen, {"linear.weight": torch.ones(2, 3), "linear.bias": torch.zeros(2)})
    assert not any(p.requires_grad for p in built.parameters())


def test_blur_kernels_equal_the_outer_products():
    k = torch.tensor((1 / 8, 3 / 8, 3 / 8, 1 / 8))
    assert torch.equal(blur_kernel(), torch.outer(k, k)) and blur_kernel().dtype == torch.float32
    assert torch.equal(KDownsample2D().kernel, torch.outer(k, k))
    assert torch.equal(KUpsample2D().kernel, torch.outer(2 * k, 2 * k))


@pytest.mark.parametrize("std", [1.0, 2.0])
def test_fourier_features_draw_as_before(std):
    torch.manual_seed(3)
    reference = torch.randn(8) * std
    torch.manual_seed(3)
    assert torch.equal(FourierFeatures(8, std).weight, reference)
    with torch.device("meta"):
        assert FourierFeatures(8, std).weight.shape == (8,)


def test_meta_key_list_imports_no_dynamo():
    """The key list of a U-Net (a meta-device build) in a fresh interpreter runs no Python reference kernel: neither
    torch._dynamo nor the symbolic shapes they import get imported."""
    code = """
import sys
from latentup.nn.unet import UNet, UNetConfig
from latentup.weights.strict import expected_shapes
config = UNetConfig(channels=(32, 32, 64), depths=(1, 1, 1), self_attn=(False, False, True),
                    cross_attn=(False, False, True), cross_attention_dim=24, head_dim=32, mapping_dim=64,
                    mapping_cond_dim=0)
assert "time_proj.weight" in expected_shapes(lambda: UNet(config))
print([name for name in ("torch._dynamo", "torch.fx.experimental.symbolic_shapes") if name in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
