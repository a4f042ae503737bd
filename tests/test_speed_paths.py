"""The fast paths compute what the plain paths compute: precomputed conditioning, the fused AdaGroupNorm,
channels_last, torch.compile, batched CFG with per-call preparation, and a step loop without host syncs."""

import math

import pytest
import torch
import torch.nn.functional as F

from latentup.diffusion.guidance import guided
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.samplers import SAMPLERS
from latentup.diffusion.schedules import sigmas_karras, sigmas_log_linear
from latentup.nn.layers import AdaGroupNorm
from latentup.nn.unet import UNet, UNetConfig

SMALL = UNetConfig(channels=(32, 32, 64, 64), depths=(1, 2, 1, 1), head_dim=16, cross_attention_dim=8,
                   mapping_dim=64, mapping_cond_dim=12)


def small_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(SMALL).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # k-diffusion zero-inits it; make the output non-trivial
    return unet


def inputs(batch=2, size=16, tokens=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, SMALL.in_channels, size, size, generator=g)
    c_noise = torch.randn(batch, generator=g)
    mapping_cond = torch.randn(batch, SMALL.mapping_cond_dim, generator=g)
    context = torch.randn(batch, tokens, SMALL.cross_attention_dim, generator=g)
    mask = torch.arange(tokens)[None] < torch.tensor([[2], [tokens]])
    return x, c_noise, mapping_cond, context, mask


def test_precomputed_conditioning_equals_plain_forward():
    unet = small_unet()
    x, c_noise, mapping_cond, context, mask = inputs()
    with torch.no_grad():
        plain = unet(x, c_noise, mapping_cond, context, mask)
        cond = unet.condition(mapping_cond, context, mask)
        fast = unet(x, c_noise, conditioning=cond)
    assert sum(kv is not None for kv in cond.kv) == 6  # levels with cross-attention: 3 down, 3 up
    assert torch.equal(fast, plain)


def test_fused_adagroupnorm_equals_groupnorm_then_affine():
    torch.manual_seed(0)
    norm = AdaGroupNorm(16, 64)
    x, emb = torch.randn(3, 64, 5, 7), torch.randn(3, 16)
    scale, shift = norm.linear(emb)[:, :, None, None].chunk(2, dim=1)
    expected = F.group_norm(x, 2, eps=1e-5) * (1 + scale) + shift
    fused = norm(x, emb)  # contiguous: one GroupNorm over [1, B*C, H, W]
    unfused = norm(x.contiguous(memory_format=torch.channels_last), emb)
    err = max((fused - expected).abs().max().item(), (unfused - expected).abs().max().item())
    print(f"AdaGroupNorm fused / channels_last vs reference: max |Δ| {err:.1e}")
    assert err < 1e-5


def test_channels_last_unet_equals_eager():
    unet = small_unet()
    x, c_noise, mapping_cond, context, mask = inputs()
    with torch.no_grad():
        expected = unet(x, c_noise, mapping_cond, context, mask)
        unet.to(memory_format=torch.channels_last)
        got = unet(x.contiguous(memory_format=torch.channels_last), c_noise, mapping_cond, context, mask)
    err = (got - expected).abs().max().item()
    print(f"channels_last U-Net: max |Δ| {err:.1e} (output scale {expected.abs().max():.2f})")
    assert err <= 1e-5 * expected.abs().max()


def test_compiled_unet_equals_eager():
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    unet = small_unet()
    x, c_noise, mapping_cond, context, mask = inputs()
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)  # one graph, no C++ toolchain needed
    with torch.no_grad():
        cond = unet.condition(mapping_cond, context, mask)
        expected = unet(x, c_noise, conditioning=cond)
        got = compiled(x, c_noise, conditioning=cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_guided_prepares_once_and_batches_both_halves():
    calls, prepared = [], []

    def denoiser(x, sigma, image_cond, conditioning):
        calls.append(x.shape[0])
        return x * 0 + conditioning[:, None, None, None]

    def prepare(image_cond, context):
        prepared.append(context.shape[0])
        return {"image_cond": image_cond, "conditioning": context.sum(dim=(1, 2))}

    half = {"image_cond": torch.zeros(1, 4, 2, 2)}
    model = guided(denoiser, {**half, "context": torch.ones(1, 3, 2)}, 5.0, {**half, "context": torch.zeros(1, 3, 2)},
                   prepare=prepare)
    for sigma in (2.0, 1.0, 0.5):
        out = model(torch.zeros(1, 4, 2, 2), torch.tensor(sigma))
    assert prepared == [2] and calls == [2, 2, 2]
    assert torch.allclose(out, torch.full_like(out, 5.0 * 6))  # D_u + g (D_c - D_u) with D_u = 0, D_c = 6


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_step_loop_keeps_sigmas_on_the_device(name):
    """On the meta device any read of a value (a host sync on CUDA) raises: the loop must not need one."""
    seen = []

    def model(x, sigma):
        seen.append(sigma.device)
        return x * 0.5

    x = torch.zeros(1, 4, 8, 8, device="meta")
    for sigmas in (sigmas_log_linear(3), sigmas_karras(3)):
        out = SAMPLERS[name](model, x, sigmas, noise=torch.zeros_like)
        assert out.device.type == "meta"
    assert seen and all(d.type == "meta" for d in seen)


def test_denoiser_prepare_equals_plain_call():
    unet = small_unet()
    denoiser = KarrasDenoiser(unet)
    x, _, mapping_cond, context, mask = inputs()
    image_cond, x = x[:, 4:], x[:, :4] * 3
    cond = {"image_cond": image_cond, "mapping_cond": mapping_cond, "context": context, "context_mask": mask}
    sigma = torch.tensor(2.5)
    with torch.no_grad():
        assert torch.equal(denoiser(x, sigma, **denoiser.prepare(**cond)), denoiser(x, sigma, **cond))


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    from pipeline_fixtures import make_diffusers_pipeline

    from latentup.pipeline import Upscaler

    return Upscaler.from_pretrained(make_diffusers_pipeline(tmp_path_factory.mktemp("diffusers")), dtype="float32")


def test_upscaler_encodes_text_and_conditions_once_per_call(upscaler, monkeypatch):
    counts = {"encode": 0, "condition": 0}
    for obj, name in ((upscaler.text, "encode"), (upscaler.unet, "condition")):
        original = getattr(obj, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(obj, name, counted)
    upscaler.upscale_latent(torch.randn(1, 4, 8, 8), prompt="a", negative_prompt="b", steps=3, cfg_scale=7.0)
    assert counts == {"encode": 1, "condition": 1}


def test_upscaler_knobs_below_the_tile_sizes_keep_the_output(upscaler):
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    settings = {"prompt": "a photo", "negative_prompt": "blurry", "steps": 3, "cfg_scale": 7.5, "seed": 4}

    def outputs(up):  # the 2x latent and its decode (with the upscaler's autoencoder tiling)
        return up.upscale_latent(latent, **settings), up.upscale_latent_to_image(latent, **settings)

    expected, expected_image = outputs(upscaler)
    got, image = outputs(upscaler.with_options(channels_last=True, unet_tile=24, vae_tile=24))  # 16x24 fits one tile
    tiled = upscaler.with_options(vae_tile=16).upscale_latent_to_image(latent, **settings)  # tiles below the side
    err, image_err = (got - expected).abs().max().item(), (image - expected_image).abs().max().item()
    print(f"channels_last + untriggered tiling: max |Δ| latent {err:.1e} (output scale {expected.abs().max():.2f}), "
          f"image {image_err:.1e}; vae_tile=16: {(tiled - expected_image).abs().max():.1e}")
    assert err <= 1e-4 * expected.abs().max() and image_err <= 1e-4
    assert (tiled - expected_image).abs().max() > 1e-2


def test_compiled_upscaler_reuses_one_graph_across_sizes_and_reports_first_calls(upscaler, monkeypatch, capsys):
    """compile=default on the CPU (aot_eager instead of inductor: no C++ build; no Winograd path, whose tile
    choices specialise on the size, as on CUDA): the same latents as eager, one static graph for the first shape,
    one graph dynamic in batch, height and width for every later shape, each first call reported."""
    import functools

    from latentup.diffusion import compiled

    torch._dynamo.reset()
    monkeypatch.setattr(compiled.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager, fast = (upscaler.with_options(compile=mode, winograd=False) for mode in (None, "default"))
    assert isinstance(fast.denoiser.unet, compiled.ReportedCompile)
    settings = {"prompt": "a photo", "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7.5, "seed": 4}
    graphs = compiled._graphs_compiled()
    for batch, h, w in ((1, 8, 8), (1, 12, 8), (2, 8, 16), (1, 12, 12), (1, 12, 8)):  # sides, then batch, change
        latent = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(h * w))
        torch.testing.assert_close(fast.upscale_latent(latent, **settings), eager.upscale_latent(latent, **settings),
                                   rtol=1e-3, atol=5e-4)  # compiled, AdaGroupNorm normalises first: other rounding
    reports = [line for line in capsys.readouterr().err.splitlines() if line.startswith("torch.compile")]
    assert [("compiled a new graph" in line, line.split(" at ")[1].split()[0]) for line in reports] == [
        (True, "2×8×16×16"), (True, "2×8×24×16"), (False, "4×8×16×32"), (False, "2×8×24×24")]  # 5th seen: silent
    assert compiled._graphs_compiled() - graphs == 2


@pytest.mark.parametrize("mode, device, images, expected", [
    ("auto", "cuda", math.inf, "reduce-overhead"), ("auto", "cuda", 64, "reduce-overhead"), ("auto", "cuda", 63, None),
    ("auto", "cpu", math.inf, None), (None, "cuda", math.inf, None), ("default", "cpu", 1, "default")])
def test_compile_auto_compiles_only_long_cuda_jobs(mode, device, images, expected):
    from latentup.settings import resolve_compile

    assert resolve_compile(mode, device, images) == expected


def test_upscaler_defaults_nchw_and_graphs_only_on_cuda(upscaler):
    from latentup.diffusion.graphed import GraphedDenoiser

    assert upscaler.channels_last is False and not isinstance(upscaler.denoiser, GraphedDenoiser)  # CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_graphed_step_equals_eager(tmp_path):
    from pipeline_fixtures import make_diffusers_pipeline

    from latentup.diffusion.graphed import GraphedDenoiser
    from latentup.pipeline import Upscaler

    cuda = Upscaler.from_pretrained(make_diffusers_pipeline(tmp_path), device="cuda", dtype="float32")
    assert isinstance(cuda.denoiser, GraphedDenoiser) and not cuda.channels_last
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    settings = {"prompt": "a photo", "negative_prompt": "blurry", "steps": 4, "cfg_scale": 7.5, "seed": 4}
    graphed = cuda.upscale_latent(latent, **settings)
    cuda.denoiser.enabled = False
    eager = cuda.upscale_latent(latent, **settings)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def test_compile_cache_outlives_the_process(monkeypatch, tmp_path):
    from latentup.diffusion.compiled import compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache() == tmp_path / "latentup" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache() == tmp_path / "mine"  # the user's choice wins


def test_gpu_check_smoke_runs_every_cpu_part(tmp_path):
    """benchmarks/gpu_check.py --device cpu --tiny: the H200 script's parts on shrunk configs, one table."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_check

    rows = gpu_check.main(["--device", "cpu", "--tiny", "--parts", "sampling", "decoders", "training", "compile",
                           "--out", str(tmp_path / "check.jsonl")])
    parts = {row["part"] for row in rows}
    assert parts == {"sampling", "decoders", "training", "compile"} and not any("error" in row for row in rows)
    sampled = {row["run"]: row for row in rows if row["part"] == "sampling"}
    assert sampled["latentup eager"]["max_abs_diff"] < 2e-3 and sampled["latentup eager"]["max_abs_diff_fp32"] < 2e-3
    assert all(row["samples_per_sec"] > 0 for row in rows if row["part"] == "training")
    assert (tmp_path / "check.jsonl").read_text().count("\n") == len(rows)
    assert any(line.startswith("correctness") for line in gpu_check.checks(rows))
