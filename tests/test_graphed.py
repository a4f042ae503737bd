"""The CUDA-graph denoiser (latentup.diffusion.graphed) computes what the eager denoiser computes, and stays out of
the way where it does not apply."""

import pytest
import torch

from latentup.diffusion.graphed import GraphedDenoiser
from latentup.diffusion.guidance import guided
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.samplers import SAMPLERS
from latentup.diffusion.schedules import sigmas_log_linear
from test_speed_paths import inputs, small_unet


def conditioning(device="cpu", batch=1):
    x, _, mapping_cond, context, mask = (t.to(device) for t in inputs(batch=2))
    cond = {"image_cond": x[:batch, 4:], "mapping_cond": mapping_cond[:batch], "context": context[:batch],
            "context_mask": mask[:batch]}
    return cond, {**cond, "context": torch.zeros_like(cond["context"])}, x[:batch, :4]


def run(name, denoiser, cond, uncond, x, sigmas):
    """Sample as the pipeline does: CFG through ``guided``, which prepares the conditioning once per call."""
    model = guided(denoiser, cond, 5.0, uncond, prepare=denoiser.prepare)
    return SAMPLERS[name](model, x * sigmas[0], sigmas, noise=torch.zeros_like)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_graphed_sampling_on_cpu_equals_eager(name):
    denoiser = KarrasDenoiser(small_unet())
    cond, uncond, x = conditioning()
    sigmas = sigmas_log_linear(4)
    with torch.no_grad():
        expected = run(name, denoiser, cond, uncond, x, sigmas)
        wrapped = GraphedDenoiser(denoiser)
        got = run(name, wrapped, cond, uncond, x, sigmas)
    assert torch.equal(got, expected) and wrapped._call().graph is None


def test_graphed_step_loop_needs_no_host_sync():
    """On the meta device any read of a value (a host sync on CUDA) raises."""
    calls = []

    class Denoiser(torch.nn.Module):
        def prepare(self, **cond):
            return cond

        def forward(self, x, sigma, **cond):
            calls.append(sigma.device)
            return x * 0.5

    wrapped = GraphedDenoiser(Denoiser())
    model = guided(wrapped, {"c": None}, 1.0, prepare=wrapped.prepare)
    out = SAMPLERS["euler"](model, torch.zeros(1, 4, 8, 8, device="meta"), sigmas_log_linear(3))
    assert out.device.type == "meta" and len(calls) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_graphed_sampling_on_cuda_equals_eager(name):
    denoiser = KarrasDenoiser(small_unet().cuda())
    sigmas = sigmas_log_linear(6)
    wrapped = GraphedDenoiser(denoiser)
    with torch.no_grad():
        for batch in (1, 2):  # the second call prepares anew and records a graph of another shape
            cond, uncond, x = conditioning("cuda", batch)
            expected = run(name, denoiser, cond, uncond, x, sigmas)
            got = run(name, wrapped, cond, uncond, x, sigmas)
            assert wrapped._call().graph is not None and wrapped.enabled
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
