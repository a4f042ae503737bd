"""The CUDA-graph denoiser (latentup.diffusion.graphed) computes what the eager denoiser computes, and stays out of
the way where it does not apply."""

import pytest
import torch

from latentup.diffusion.graphed import GraphedDenoiser, tensors_of
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


def test_next_call_reuses_the_recorded_graph_when_its_conditioning_fits():
    """prepare copies a same-shaped conditioning into the recorded buffers (the graph reads them) and returns them."""
    denoiser = KarrasDenoiser(small_unet())
    wrapped = GraphedDenoiser(denoiser)
    cond, uncond, _ = conditioning()
    with torch.no_grad():
        first = wrapped.prepare(**cond)
        wrapped._call().graph = "recorded"  # as after a capture on CUDA
        second = wrapped.prepare(**uncond)
        expected = denoiser.prepare(**uncond)
        assert second is first and wrapped._call().graph == "recorded"
        for buffer, value in zip(tensors_of(second), tensors_of(expected), strict=True):
            assert torch.equal(buffer, value)
        assert len(tensors_of(second)) > 10  # image_cond, embeddings, every block's text K/V
        other, *_ = conditioning(batch=2)
        third = wrapped.prepare(**other)  # another batch: a new graph
        assert third is not first and wrapped._call().graph is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_graphed_sampling_on_cuda_equals_eager(name):
    denoiser = KarrasDenoiser(small_unet().cuda())
    sigmas = sigmas_log_linear(6)
    wrapped = GraphedDenoiser(denoiser)
    with torch.no_grad():
        graphs = []
        for i, batch in enumerate((1, 1, 2)):  # the second call reuses the graph, the third records another one
            cond, uncond, x = conditioning("cuda", batch)
            if i == 1:  # other values, same shapes
                cond, uncond, x = uncond, cond, -x
            expected = run(name, denoiser, cond, uncond, x, sigmas)
            got = run(name, wrapped, cond, uncond, x, sigmas)
            graphs.append(wrapped._call().graph)
            assert graphs[-1] is not None and wrapped.enabled
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert graphs[1] is graphs[0] and graphs[2] is not graphs[1]
