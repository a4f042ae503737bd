"""The CUDA-graph step (latentup.diffusion.graphed) computes what the eager model computes, and stays out of the way
where it does not apply."""

import pytest
import torch

from latentup.diffusion.graphed import GraphedModel, graphed
from latentup.diffusion.guidance import guided
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.samplers import SAMPLERS
from latentup.diffusion.schedules import sigmas_log_linear
from test_speed_paths import inputs, small_unet


def small_model(device="cpu"):
    """A guided KarrasDenoiser over the small U-Net, as Upscaler.sample builds it."""
    unet = small_unet().to(device)
    denoiser = KarrasDenoiser(unet)
    x, _, mapping_cond, context, mask = (t.to(device) for t in inputs(batch=1))
    half = {"image_cond": x[:, 4:], "mapping_cond": mapping_cond, "context": context, "context_mask": mask[:1]}
    uncond = {**half, "context": torch.zeros_like(context)}
    return guided(denoiser, half, 5.0, uncond, prepare=denoiser.prepare), x[:, :4]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_graphed_sampling_on_cpu_equals_eager(name):
    model, x = small_model()
    sigmas = sigmas_log_linear(4)
    with torch.no_grad():
        expected = SAMPLERS[name](model, x * sigmas[0], sigmas, noise=torch.zeros_like)
        wrapped = graphed(model)
        got = SAMPLERS[name](wrapped, x * sigmas[0], sigmas, noise=torch.zeros_like)
    assert torch.equal(got, expected)
    assert wrapped.graph is None and graphed(wrapped) is wrapped


def test_graphed_step_loop_needs_no_host_sync():
    """On the meta device any read of a value (a host sync on CUDA) raises."""
    calls = []
    wrapped = GraphedModel(lambda x, sigma: calls.append(sigma.device) or x * 0.5)
    x = torch.zeros(1, 4, 8, 8, device="meta")
    out = SAMPLERS["euler"](wrapped, x, sigmas_log_linear(3))
    assert out.device.type == "meta" and len(calls) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_graphed_sampling_on_cuda_equals_eager(name):
    model, x = small_model("cuda")
    sigmas = sigmas_log_linear(6)
    with torch.no_grad():
        expected = SAMPLERS[name](model, x * sigmas[0], sigmas, noise=torch.zeros_like)
        wrapped = graphed(model)
        got = SAMPLERS[name](wrapped, x * sigmas[0], sigmas, noise=torch.zeros_like)
        assert wrapped.graph is not None and not wrapped.failed
        again = SAMPLERS[name](wrapped, torch.cat([x, x]) * sigmas[0], sigmas, noise=torch.zeros_like)  # recapture
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, torch.cat([expected, expected]), rtol=1e-5, atol=1e-5)
