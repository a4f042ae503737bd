"""The decoder-space loss: its windows, weighting and gradients, bad settings, and its place in the training loss."""

import pytest
import torch

from latentup.errors import ConfigError
from latentup.training.decoder_loss import DecoderLoss
from latentup.training.module import UpscalerModule

TINY = {"channels": (32, 64), "depths": (1, 1), "self_attn": (False, False), "cross_attn": (False, False),
        "cross_attention_dim": None, "head_dim": 32, "mapping_dim": 64, "mapping_cond_dim": 128}


def test_windows_weight_and_chosen_samples():
    """The samples at stream positions ≡ 0 mod ``every`` are scored on the window their uniforms place (u = 0:
    top-left, u → 1: bottom-right), times the weight; the others get 0 and no gradient, and nothing outside the
    windows gets a gradient."""
    torch.manual_seed(0)
    denoised, target = torch.randn(4, 4, 5, 6, requires_grad=True), torch.randn(4, 4, 5, 6)
    positions = torch.tensor([7, 8, 9, 10])  # every = 2: positions 8 and 10 (batch rows 1 and 3)
    u = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.5, 0.5], [0.999, 0.999]])
    loss = DecoderLoss(weight=3.0, window=2, every=2)(lambda z: 2 * z, denoised, target, positions, u)
    windows = {1: (slice(0, 2), slice(0, 2)), 3: (slice(3, 5), slice(4, 6))}
    for i, (rows, cols) in windows.items():
        expected = 3.0 * (2 * (denoised[i, :, rows, cols] - target[i, :, rows, cols])).pow(2).mean()
        torch.testing.assert_close(loss[i], expected)
    assert loss[0] == loss[2] == 0
    loss.sum().backward()
    inside = torch.zeros_like(denoised, dtype=torch.bool)
    for i, (rows, cols) in windows.items():
        inside[i, :, rows, cols] = True
    assert (denoised.grad[inside] != 0).all() and (denoised.grad[~inside] == 0).all()


def test_the_choice_does_not_depend_on_how_the_batch_is_split():
    """Two ranks' halves of a batch score the same samples, with the same values, as the whole batch."""
    torch.manual_seed(0)
    denoised, target, u = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6), torch.rand(8, 2)
    positions = torch.arange(16, 24)
    loss = DecoderLoss(weight=1.0, window=4, every=4)
    whole = loss(torch.tanh, denoised, target, positions, u)
    halves = torch.cat([loss(torch.tanh, denoised[h], target[h], positions[h], u[h])
                        for h in (slice(0, 4), slice(4, 8))])
    torch.testing.assert_close(whole, halves)
    assert (whole != 0).tolist() == [True, False, False, False, True, False, False, False]


def test_a_window_larger_than_the_latent_takes_it_whole():
    denoised, target = torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    loss = DecoderLoss(weight=1.0, window=16, every=1)(lambda z: z, denoised, target, torch.arange(2), torch.rand(2, 2))
    torch.testing.assert_close(loss, torch.ones(2))


def test_the_perceptual_term_adds_its_weighted_distance_to_the_chosen_samples():
    """perceptual · distance(dec(D[W]), dec(z_hr[W])) is added to the scored samples only, with gradients."""
    torch.manual_seed(0)
    denoised, target = torch.randn(4, 4, 6, 6, requires_grad=True), torch.randn(4, 4, 6, 6)
    positions, u = torch.arange(4), torch.rand(4, 2)

    def distance(image, reference):  # a stand-in for LPIPS: mean absolute difference per image
        return (image - reference).abs().flatten(1).mean(1)

    plain = DecoderLoss(weight=2.0, window=4, every=2)(torch.tanh, denoised, target, positions, u)
    both = DecoderLoss(weight=2.0, window=4, every=2, perceptual=0.5)(torch.tanh, denoised, target, positions, u,
                                                                       distance)
    added = both - plain
    assert added[0] > 0 and added[2] > 0 and added[1] == added[3] == 0
    halves = DecoderLoss(weight=2.0, window=4, every=2, perceptual=0.25)(torch.tanh, denoised, target, positions, u,
                                                                        distance)
    torch.testing.assert_close(added, 2 * (halves - plain))
    added.sum().backward()
    assert denoised.grad.abs().sum() > 0


def test_the_pixels_reference_is_the_hr_image_under_the_window():
    """reference=pixels scores dec(D[W]) against the HR pixels under W (f·W for an f× decoder), uint8 or float, and
    needs them."""
    torch.manual_seed(0)
    denoised = torch.randn(2, 4, 5, 6)
    hr = torch.randint(0, 256, (2, 4, 10, 12), dtype=torch.uint8)  # f = 2 "images" of 4 channels
    u = torch.tensor([[0.999, 0.0], [0.0, 0.999]])

    def decode(z):
        return z.repeat_interleave(2, -2).repeat_interleave(2, -1)

    loss = DecoderLoss(weight=3.0, window=2, every=1, reference="pixels")
    got = loss(decode, denoised, None, torch.arange(2), u, pixels=hr)
    windows = [(slice(3, 5), slice(0, 2)), (slice(0, 2), slice(4, 6))]  # latent px; ×2 in the image
    for i, (rows, cols) in enumerate(windows):
        reference = hr[i, :, 2 * rows.start:2 * rows.stop, 2 * cols.start:2 * cols.stop].float() / 255
        torch.testing.assert_close(got[i], 3.0 * (decode(denoised[i, :, rows, cols]) - reference).pow(2).mean())
    torch.testing.assert_close(loss(decode, denoised, None, torch.arange(2), u, pixels=hr.float() / 255), got)
    with pytest.raises(ConfigError, match="data.prepare.settings.pixels=true"):
        loss(decode, denoised, None, torch.arange(2), u)


@pytest.mark.parametrize("field", ["weight", "window", "every"])
def test_bad_settings_are_config_errors(field):
    with pytest.raises(ConfigError, match=f"decoder_loss.{field} must be > 0"):
        DecoderLoss(**{field: 0})


def test_a_negative_perceptual_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="decoder_loss.perceptual must be >= 0"):
        DecoderLoss(perceptual=-1.0)


def test_an_unknown_reference_is_a_config_error():
    with pytest.raises(ConfigError, match="decoder_loss.reference must be decoded or pixels"):
        DecoderLoss(reference="hr")


def test_training_loss_adds_the_weighted_decoder_term_to_the_chosen_samples():
    from latentup.autoencoders import load_autoencoder

    taesd = load_autoencoder("taesd").eval()
    batch = {"hr": torch.randn(2, 4, 16, 16), "lr": torch.randn(2, 4, 8, 8), "position": torch.tensor([0, 1])}
    losses = {}
    for weight in (None, 1.0, 2.0):
        torch.manual_seed(0)  # the same U-Net initialisation each time
        module = UpscalerModule(TINY, autoencoder=taesd, validation={"lpips": False},
                                decoder_loss=weight and {"weight": weight, "window": 8, "every": 2})
        with torch.no_grad():
            losses[weight] = module.forward_loss(batch)
    once, twice = losses[1.0] - losses[None], losses[2.0] - losses[None]
    assert once[0] > 0 and once[1] == 0
    torch.testing.assert_close(twice, 2 * once)
    with pytest.raises(ConfigError, match="decoder_loss needs an autoencoder"):
        UpscalerModule(TINY, decoder_loss={"weight": 1.0})


def test_the_perceptual_term_is_lpips_of_the_decoded_windows():
    """With ``perceptual`` the module adds LPIPS-alex (the evaluation's metric) of the decoded windows; it scores
    identical images 0 and differs for different ones."""
    from latentup.autoencoders import load_autoencoder
    from latentup.evaluation.metrics import build_lpips

    taesd = load_autoencoder("taesd").eval()
    module = UpscalerModule(TINY, autoencoder=taesd, validation={"lpips": False},
                            decoder_loss={"weight": 1.0, "window": 8, "every": 1, "perceptual": 1.0})
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    metric = build_lpips()
    torch.testing.assert_close(module.lpips_distance(a, b), metric(a, b).reshape(-1).float())
    assert module.lpips_distance(a, a).abs().max() < 1e-6
    assert "lpips" not in dict(module.named_modules()) and not any("lpips" in k for k in module.state_dict())
