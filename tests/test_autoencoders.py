"""Autoencoders: parity with diffusers (KL VAE, AutoencoderTiny, randn_tensor, ldm converter), real TAESD
weights, loading paths and errors. fp32, CPU, seeded."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentup.autoencoders import TAESD, AutoencoderKL, load_autoencoder
from latentup.autoencoders.base import randn
from latentup.autoencoders.kl import KLConfig, ldm_to_diffusers
from latentup.autoencoders.taesd import autoencoder_tiny_to_taesd
from latentup.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = Path(os.environ.get("LATENTUP_WEIGHTS", SHARED / "weights"))
SET5 = SHARED / "datasets" / "eval" / "Set5"
needs_taesd = pytest.mark.skipif(not (WEIGHTS / "taesd").is_dir(), reason="no TAESD weights folder")
SMALL = KLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def weights_env(monkeypatch):
    monkeypatch.setenv("LATENTUP_WEIGHTS", str(WEIGHTS))


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> float:
    """Max abs error, asserted <= tol relative to the reference's scale (at least 1)."""
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), err
    return err


def image(shape=(2, 3, 64, 96), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def photo(name: str) -> torch.Tensor:
    array = np.array(Image.open(SET5 / name).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / (a - b).pow(2).mean())).item()


def twin(cfg: KLConfig) -> tuple[AutoencoderKL, "diffusers.AutoencoderKL"]:
    ours = AutoencoderKL(cfg).eval()
    ref = diffusers.AutoencoderKL.from_config(cfg.to_diffusers()).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def check_kl_parity(cfg: KLConfig, x: torch.Tensor) -> dict[str, float]:
    ours, ref = twin(cfg)
    s, shift = cfg.scaling_factor, cfg.shift_factor or 0.0
    post = ref.encode(2 * x - 1).latent_dist
    mean, std = ours._posterior(ours._encode_raw(x))
    errs = {"mean": close(mean, post.mean), "std": close(std, post.std)}
    errs["encode_mean"] = close(ours.encode(x, sample=False), (post.mean - shift) * s)
    errs["sample_one_gen"] = close(ours.encode(x, gens(7)[0]), (post.sample(gens(7)[0]) - shift) * s)
    seeds = range(10, 10 + len(x))
    errs["sample_gen_list"] = close(ours.encode(x, gens(*seeds)), (post.sample(gens(*seeds)) - shift) * s)
    latent = (post.mean - shift) * s
    errs["decode"] = close(ours.decode(latent), ((ref.decode(latent / s + shift).sample + 1) / 2).clamp(0, 1))
    return errs


def test_kl_small_matches_diffusers():
    errs = check_kl_parity(SMALL, image())
    print("small KL max abs errors:", errs)


def test_kl_sd3_style_shift_and_no_quant_conv_match_diffusers():
    cfg = KLConfig(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                   scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    errs = check_kl_parity(cfg, image((1, 3, 32, 48)))
    assert AutoencoderKL(cfg).downscale == 4 and "quant_conv.weight" not in AutoencoderKL(cfg).state_dict()
    print("SD3-style KL max abs errors:", errs)


def test_kl_released_config_matches_diffusers():
    config = json.loads((SHARED / "spec" / "vae_config.json").read_text())
    cfg = KLConfig.from_diffusers(config)
    assert sum(p.numel() for p in AutoencoderKL(cfg).parameters()) == 83_653_863
    errs = check_kl_parity(cfg, image((2, 3, 64, 96)))
    print("released-config KL max abs errors:", errs)


def test_randn_reproduces_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    cpu = torch.device("cpu")
    cases = [((3, 4, 5, 6), lambda: gens(1)[0]), ((3, 4, 5, 6), lambda: gens(1, 2, 3)), ((1, 4, 5, 6), lambda: gens(4))]
    for shape, generator in cases:
        assert torch.equal(randn(shape, generator(), cpu, torch.float32),
                           randn_tensor(shape, generator=generator(), device=cpu, dtype=torch.float32))
    torch.manual_seed(3)
    ours = randn((2, 4, 3, 3), None, cpu, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(ours, randn_tensor((2, 4, 3, 3), device=cpu, dtype=torch.float32))


def test_generator_list_gives_each_sample_its_own_draw():
    vae = AutoencoderKL(SMALL).eval()
    x = image((2, 3, 32, 32))
    both = vae.encode(x, gens(5, 6))
    close(both[1:], vae.encode(x[1:], gens(6)), 1e-5)  # same noise; batch size changes conv numerics only
    assert not torch.equal(both, vae.encode(x, sample=False))
    with pytest.raises(Exception, match="one per sample"):
        vae.encode(x, gens(1, 2, 3))


# --- ldm (CompVis / A1111) layout -------------------------------------------------------------------

def diffusers_to_ldm(state: dict, n_levels: int) -> dict:
    """The inverse of the ldm -> diffusers key mapping, written independently for the test."""
    out = {}
    for key, value in state.items():
        key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in key:
            key = key.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            key = key.replace("to_out.0", "proj_out").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
            value = value[:, :, None, None] if value.ndim == 2 else value
        key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
        key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
        key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.block.", key)
        key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.upsample.", key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def three_levels():
    cfg = KLConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8)
    vae = AutoencoderKL(cfg)
    return cfg, vae.state_dict(), diffusers_to_ldm(vae.state_dict(), 3)


def test_ldm_to_diffusers_matches_diffusers_converter(three_levels):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg, state, ldm = three_levels
    assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    ours, theirs = ldm_to_diffusers(ldm), convert_ldm_vae_checkpoint(dict(ldm), cfg.to_diffusers())
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], state[k]) for k in state)
    AutoencoderKL(cfg).load_state_dict(ours, strict=True)


def test_ldm_full_checkpoint_and_single_file(three_levels, tmp_path):
    cfg, state, ldm = three_levels
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full |= {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "cond_stage_model.x": torch.zeros(1)}
    converted = ldm_to_diffusers(full)
    assert converted.keys() == state.keys()

    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "sd.safetensors")
    torch.save({"state_dict": dict(ldm, **{"loss.logvar": torch.zeros(())})}, tmp_path / "vae.ckpt")
    for path in (tmp_path / "sd.safetensors", tmp_path / "vae.ckpt"):
        vae = AutoencoderKL.from_single_file(path)
        assert vae.config.block_out_channels == (32, 64, 64) and vae.config.layers_per_block == 2
        assert all(torch.equal(vae.state_dict()[k], state[k]) for k in state)
    assert AutoencoderKL.from_single_file(tmp_path / "vae.ckpt", scaling_factor=0.13025).scaling_factor == 0.13025


# --- TAESD ------------------------------------------------------------------------------------------

def taesd_to_autoencoder_tiny(model: TAESD) -> dict:
    """Our layout -> diffusers AutoencoderTiny layout (its decoder Sequential has no clamp module)."""
    out = {}
    for key, value in model.state_dict().items():
        part, index, rest = key.split(".", 2)
        out[f"{part}.layers.{int(index) - (part == 'decoder')}.{rest}"] = value
    return out


@needs_taesd
def test_taesd_real_weights_load_strictly(weights_env):
    params = {}
    for variant, channels in (("sd", 4), ("sdxl", 4), ("sd3", 16), ("flux", 16)):
        model = TAESD.from_weights_folder(variant)
        assert model.latent_channels == channels
        assert all(p.dtype == torch.float32 for p in model.parameters())
        params[variant] = tuple(sum(p.numel() for p in part.parameters()) for part in (model.encoder, model.decoder))
    # 16 latent channels: encoder conv_out and decoder conv_in gain 12 x 64 x 9 weights (+ 12 biases in the encoder)
    assert params == {"sd": (1_222_532, 1_222_531), "sdxl": (1_222_532, 1_222_531),
                      "sd3": (1_229_456, 1_229_443), "flux": (1_229_456, 1_229_443)}


@needs_taesd
@pytest.mark.parametrize("variant", ["sd", "flux"])
def test_taesd_matches_diffusers_autoencoder_tiny(weights_env, variant, tmp_path):
    ours = TAESD.from_weights_folder(variant).eval()
    ref = diffusers.AutoencoderTiny(latent_channels=ours.latent_channels).eval()
    tiny_state = taesd_to_autoencoder_tiny(ours)
    ref.load_state_dict(tiny_state, strict=True)
    x = photo("butterfly.png")[..., :128, :128]
    latent = ours.encode(x)
    err_latent = close(latent, ref.encode(2 * x - 1).latents, 1e-5)
    err_image = close(ours.decode(latent), ((ref.decode(latent).sample + 1) / 2).clamp(0, 1), 1e-5)
    print(f"TAESD {variant} vs AutoencoderTiny: max|dlatent| {err_latent:.2e}, max|dimage| {err_image:.2e}")

    assert autoencoder_tiny_to_taesd(tiny_state).keys() == ours.state_dict().keys()
    save_file(tiny_state, tmp_path / "diffusion_pytorch_model.safetensors")
    hub_file = tmp_path / "diffusion_pytorch_model.safetensors"
    loaded = TAESD.from_files(hub_file, hub_file, variant)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


@needs_taesd
def test_taesd_found_in_the_hugging_face_cache_without_weights_folder(weights_env, tmp_path, monkeypatch):
    import huggingface_hub.constants

    ours = TAESD.from_weights_folder("sd")
    repo = tmp_path / "hub" / "models--madebyollin--taesd"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(taesd_to_autoencoder_tiny(ours), snapshot / "diffusion_pytorch_model.safetensors")
    monkeypatch.delenv("LATENTUP_WEIGHTS")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = TAESD.from_weights_folder("sd", download=True)  # found in the cache: no download is tried
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), ours.state_dict().values()))


@needs_taesd
def test_taesd_round_trip_psnr_on_a_photo(weights_env):
    x = photo("butterfly.png")
    real = TAESD.from_weights_folder("sd").eval()
    torch.manual_seed(0)
    random = TAESD("sd").eval()
    latent = real.encode(x)
    assert latent.shape == (1, 4, 32, 32)
    p_real, p_random = psnr(real.decode(latent), x), psnr(random.decode(random.encode(x)), x)
    print(f"TAESD round trip PSNR on Set5 butterfly: real {p_real:.2f} dB, random init {p_random:.2f} dB")
    assert p_real > 20 and p_random < 12


@needs_taesd
def test_all_taesd_variants_round_trip(weights_env):
    x = photo("bird.png")[..., 64:192, 64:192]
    scores = {v: psnr(m.decode(m.encode(x)), x) for v in ("sdxl", "sd3", "flux")
              for m in [TAESD.from_weights_folder(v).eval()]}
    print("TAESD round-trip PSNR on a 128px crop of Set5 bird:", scores)
    assert min(scores.values()) > 20


# --- loading paths and errors -----------------------------------------------------------------------

def save_diffusers_folder(vae: AutoencoderKL, folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(vae.config.to_diffusers()))
    save_file(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_from_diffusers_folder_and_load_autoencoder(tmp_path):
    vae = AutoencoderKL(SMALL)
    folder = save_diffusers_folder(vae, tmp_path / "pipe" / "vae")
    for spec in (folder, tmp_path / "pipe", str(folder)):
        loaded = load_autoencoder(spec, download=False)
        assert isinstance(loaded, AutoencoderKL)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    single = load_autoencoder(tmp_path / "vae.safetensors", download=False, scaling_factor=0.5)
    assert single.config.block_out_channels == (32, 64) and single.scaling_factor == 0.5


@needs_taesd
def test_load_autoencoder_names_and_hydra_configs(weights_env, tmp_path, monkeypatch):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    assert [load_autoencoder(n).variant for n in ("taesd", "taesdxl", "taesd3", "taef1")] == [
        "sd", "sdxl", "sd3", "flux"]
    assert instantiate(OmegaConf.load(ROOT / "configs" / "autoencoder" / "taesd.yaml")).variant == "sd"
    sd_vae = OmegaConf.load(ROOT / "configs" / "autoencoder" / "sd_vae.yaml")
    monkeypatch.setenv("LATENTUP_SD_VAE", str(save_diffusers_folder(AutoencoderKL(SMALL), tmp_path / "vae")))
    assert isinstance(instantiate(sd_vae), AutoencoderKL)
    monkeypatch.delenv("LATENTUP_SD_VAE")
    with pytest.raises(Exception) as error:
        instantiate(sd_vae)
    assert isinstance(error.value, WeightsNotFoundError) or isinstance(error.value.__cause__, WeightsNotFoundError)


def test_missing_weights_raise_weights_not_found(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("LATENTUP_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError, match=r"taesd/taesd_encoder\.safetensors.*LATENTUP_WEIGHTS") as error:
        TAESD.from_weights_folder("sd")
    assert "\n" not in str(error.value)
    no_weights = tmp_path / "vae_without_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(SMALL.to_diffusers()))
    calls = [  # each message names what is missing and the fix
        (lambda: TAESD.from_files(tmp_path / "no.safetensors", tmp_path / "no.safetensors"),
         r"/no\.safetensors does not exist: check the path$"),
        (lambda: AutoencoderKL.from_single_file(tmp_path / "vae.safetensors"),
         r"/vae\.safetensors does not exist: check the path$"),
        (lambda: AutoencoderKL.from_diffusers(no_weights),
         r"no diffusion_pytorch_model\.safetensors \(or \.bin\) in .*/vae_without_weights: is this a complete"),
        (lambda: load_autoencoder(tmp_path / "nothing"),
         r"/nothing' is neither taesd, taesdxl, taesd3, taef1 nor a VAE file or a diffusers folder.*check the path$"),
        (lambda: load_autoencoder(None),
         r"^no autoencoder given: set LATENTUP_SD_VAE to a VAE path or pass autoencoder\.spec=taesd\|"),
    ]
    for call, message in calls:
        with pytest.raises(WeightsNotFoundError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


@needs_taesd
def test_wrong_shapes_raise_weights_mismatch(tmp_path):
    assert TAESD.from_folder(WEIGHTS / "taesd", variant="sd").variant == "sd"
    with pytest.raises(WeightsMismatchError, match=r"shape mismatch.*14\.weight") as error:
        TAESD.from_files(WEIGHTS / "taesd" / "taesd_encoder.safetensors",
                         WEIGHTS / "taesd" / "taesd3_decoder.safetensors", variant="sd3")
    print(error.value)
    state = AutoencoderKL(SMALL).state_dict()
    state["encoder.conv_in.weight"] = torch.zeros(32, 3, 1, 1)
    with pytest.raises(WeightsMismatchError, match="encoder.conv_in.weight"):
        AutoencoderKL.from_diffusers(SMALL.to_diffusers(), weights=state)
    with pytest.raises(ConfigError):
        TAESD("sd4")
    with pytest.raises(ConfigError):
        KLConfig.from_diffusers({"down_block_types": ["CrossAttnDownBlock2D"]})
