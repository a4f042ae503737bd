"""Schedules, preconditioning, samplers and guidance: against diffusers and against analytic Gaussians."""

import math

import pytest
import torch

from latentup.diffusion.conditioning import low_res_conditioning, noise_level_embedding
from latentup.diffusion.guidance import guided
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.samplers import SAMPLERS, euler, euler_ancestral, get_sampler
from latentup.diffusion.schedules import SIGMA_MAX, SIGMA_MIN, make_sigmas, sigmas_karras, sigmas_log_linear
from latentup.errors import ConfigError



def diffusers_scheduler(name="EulerDiscreteScheduler", **overrides):
    import json

    import diffusers
    from conftest import SPEC

    config = json.loads((SPEC / "scheduler_config.json").read_text()) | overrides
    return getattr(diffusers, name).from_config(config)


@pytest.mark.parametrize("steps", [1, 8, 20, 75])
def test_log_linear_grid_is_diffusers_grid(steps):
    scheduler = diffusers_scheduler()
    scheduler.set_timesteps(steps)
    ours = sigmas_log_linear(steps)
    assert torch.equal(ours, scheduler.sigmas[:-1])  # diffusers appends a 0 its loop never reaches
    assert ours.dtype == torch.float32 and len(ours) == steps + 1


def test_sigma_extremes_match_spec():
    assert SIGMA_MIN == pytest.approx(0.0291675348, abs=1e-8)
    assert SIGMA_MAX == pytest.approx(14.6146469, abs=1e-5)
    grid = sigmas_log_linear(75)
    assert grid[1].item() == pytest.approx(13.452093, abs=1e-5)
    assert grid[74].item() == pytest.approx(0.031688, abs=1e-6)


def test_euler_step_is_bit_for_bit_diffusers():
    scheduler = diffusers_scheduler()
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g) * scheduler.init_noise_sigma

    def model(x, sigma):  # any deterministic denoiser
        return torch.tanh(x) * 0.5 + x0 * torch.sigmoid(sigma)

    ref = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        ref = scheduler.step(model(ref, scheduler.sigmas[i]), t, ref).prev_sample
    ours = euler(model, x.clone(), sigmas_log_linear(10))
    assert torch.equal(ours, ref)


def test_euler_ancestral_matches_diffusers_with_the_same_noise():
    # diffusers' ancestral scheduler takes epsilon: feed it (x - D) / sigma, so its x0 is our denoiser's output
    scheduler = diffusers_scheduler("EulerAncestralDiscreteScheduler", prediction_type="epsilon")
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g) * scheduler.init_noise_sigma

    def model(x, sigma):
        return torch.tanh(x) * 0.5 + x0 * torch.sigmoid(sigma)

    ref, g_ref = x.clone(), torch.Generator().manual_seed(3)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        ref = scheduler.step((ref - model(ref, sigma)) / sigma, t, ref, generator=g_ref).prev_sample
    g_ours = torch.Generator().manual_seed(3)  # the same randn(shape, generator) draws (diffusers' last one is unused)
    ours = euler_ancestral(model, x.clone(), scheduler.sigmas, noise=lambda t: torch.randn(t.shape, generator=g_ours))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # measured 1.2e-7 at scale 2.6
    assert (ours - euler(model, x.clone(), scheduler.sigmas)).abs().max() > 0.1  # measured 0.39: noise was added


def test_karras_grid():
    s = sigmas_karras(10, 10.0, 0.1, rho=7.0)
    assert s[0].item() == pytest.approx(10.0, rel=1e-6) and s[9].item() == pytest.approx(0.1, rel=1e-6)
    assert s[-1] == 0 and torch.all(s[:-1] > s[1:])


def test_schedule_errors():
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        make_sigmas("log_linear", 0)
    with pytest.raises(ConfigError, match="unknown schedule"):
        make_sigmas("cosine", 10)
    with pytest.raises(ConfigError, match="unknown sampler 'ddim'"):
        get_sampler("ddim")


# Data ~ N(mu, s^2) per element: the ideal denoiser is D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and the
# probability-flow ODE maps x(sigma_a) to mu + sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2)) (x - mu).
MU, S = 0.7, 0.5


def gaussian_denoiser(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def ode_solution(x, sigma_a, sigma_b):
    return MU + math.sqrt((S**2 + sigma_b**2) / (S**2 + sigma_a**2)) * (x - MU)


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_at_their_order(name, order):
    x = MU + torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    errors = []
    for steps in (20, 40, 80):
        sigmas = sigmas_karras(steps, 10.0, 0.02).double()[:-1]  # stop at sigma_min: compare with the exact ODE
        out = SAMPLERS[name](gaussian_denoiser, x, sigmas)
        errors.append((out - ode_solution(x, 10.0, float(sigmas[-1]))).abs().max().item())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < (0.05 if order == 1 else 2e-3)
    assert min(rates) > order - 0.35, (errors, rates)


def test_samplers_reach_data_distribution_to_zero():
    g = torch.Generator().manual_seed(2)
    x = MU + torch.randn(1, 1, 200, 200, generator=g, dtype=torch.float64) * math.sqrt(S**2 + 100)
    sigmas = sigmas_karras(100, 10.0, 0.01).double()
    for name in SAMPLERS:
        noise = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
        out = SAMPLERS[name](gaussian_denoiser, x.clone(), sigmas, noise=noise)
        assert out.mean().item() == pytest.approx(MU, abs=0.02), name
        assert out.std().item() == pytest.approx(S, rel=0.04), name


def test_ancestral_needs_noise():
    with pytest.raises(ConfigError, match="noise source"):
        SAMPLERS["euler_ancestral"](gaussian_denoiser, torch.zeros(1), sigmas_karras(2))


class RecordingUNet(torch.nn.Module):
    """F = a constant field plus a constant log-variance channel; records what it was called with."""

    def __init__(self, value=0.3, logvar=0.2):
        super().__init__()
        self.value, self.logvar, self.calls = value, logvar, []

    def forward(self, x, c_noise, mapping_cond=None, context=None, context_mask=None):
        self.calls.append((x.clone(), c_noise, mapping_cond))
        data = torch.full_like(x[:, :4], self.value)
        return torch.cat([data, torch.full_like(x[:, :1], self.logvar)], dim=1)


def test_preconditioning_formulas():
    unet = RecordingUNet()
    denoiser = KarrasDenoiser(unet, sigma_data=1.0)
    x = torch.randn(2, 4, 4, 4)
    cond = torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([0.5, 3.0])
    out = denoiser(x, sigma, image_cond=cond)
    net_in, c_noise, _ = unet.calls[-1]
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(net_in[:, :4], x / (s**2 + 1).sqrt())
    torch.testing.assert_close(net_in[:, 4:], cond)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(out, x / (s**2 + 1) + s / (s**2 + 1).sqrt() * 0.3)


def test_loss_is_denoiser_with_variance():
    torch.manual_seed(0)
    unet = RecordingUNet(value=0.3, logvar=0.2)
    denoiser = KarrasDenoiser(unet, sigma_data=0.5)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 5.0])
    loss = denoiser.loss(x0, noise, sigma, image_cond=torch.zeros(3, 4, 4, 4))
    sd = 0.5
    s = sigma.view(-1, 1, 1, 1)
    noised = x0 + s * noise
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    target = (x0 - c_skip * noised) / c_out
    mse = ((0.3 - target) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(loss, 0.5 * (mse * math.exp(-0.2) + 0.2))
    _, denoised = denoiser.loss_and_denoised(x0, noise, sigma, image_cond=torch.zeros(3, 4, 4, 4))
    torch.testing.assert_close(denoised, denoiser(noised, sigma, image_cond=torch.zeros(3, 4, 4, 4)))


def test_noise_level_embedding():
    w = torch.randn(64, 1) * 2
    zero = noise_level_embedding(torch.zeros(2), w)
    assert torch.equal(zero, torch.cat([torch.ones(2, 64), torch.zeros(2, 64)], 1))
    assert torch.equal(noise_level_embedding(torch.zeros(2), None), zero)
    level = torch.tensor([0.3])
    angle = 2 * math.pi * math.log1p(0.3) * w[:, 0]
    expected = torch.cat([torch.cos(angle), torch.sin(angle)])
    torch.testing.assert_close(noise_level_embedding(level, w)[0], expected)
    with pytest.raises(ConfigError, match="noise_level > 0"):
        noise_level_embedding(level, None)


def test_low_res_conditioning():
    z = torch.randn(2, 4, 3, 5)
    image_cond, embed = low_res_conditioning(z, 0.6, torch.randn(64, 1))
    assert image_cond.shape == (2, 4, 6, 10) and embed.shape == (2, 128)
    torch.testing.assert_close(image_cond[:, :, ::2, ::2], z / math.sqrt(1.36))
    torch.testing.assert_close(image_cond[:, :, 1::2, 1::2], z / math.sqrt(1.36))


def test_guidance_batches_uncond_first():
    seen = []

    def denoiser(x, sigma, image_cond, context):
        seen.append(context[:, 0, 0].tolist())
        return x * 0 + context[:, :1, :1, None].expand_as(x)

    cond = {"image_cond": torch.zeros(1, 4, 2, 2), "context": torch.full((1, 3, 2), 2.0)}
    uncond = {"image_cond": torch.zeros(1, 4, 2, 2), "context": torch.full((1, 3, 2), 1.0)}
    model = guided(denoiser, cond, 9.0, uncond)
    out = model(torch.zeros(1, 2, 2, 2), torch.tensor(1.0))
    assert seen == [[1.0, 2.0]]
    assert torch.allclose(out, torch.full_like(out, 1 + 9 * (2 - 1)))
    unguided = guided(denoiser, cond, 1.0, uncond)(torch.zeros(1, 2, 2, 2), 1.0)
    assert torch.allclose(unguided, torch.full((1, 2, 2, 2), 2.0))
