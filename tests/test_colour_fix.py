"""The colour fix and back-projection: analytic cases of the low-band swap and of consistency with the picture, the
blur against torchvision, the downscale against PIL, and their use by the pipeline."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from latentup.autoencoders import load_autoencoder
from latentup.colour_fix import back_project, colour_fix, downscale_x2, gaussian_blur
from latentup.errors import ConfigError
from latentup.imageio import to_tensor
from latentup.nn.unet import UNet, UNetConfig
from latentup.pipeline import Upscaler
from latentup.settings import Settings, parse_setting
from latentup.weights.single_file import save_upscaler


def checkerboard(h: int, w: int) -> torch.Tensor:
    """+-1 at the Nyquist frequency: a Gaussian of sigma >= 1 passes exp(-sigma^2 pi^2) of it, i.e. nothing."""
    return ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2 * 2 - 1).float().expand(1, 3, h, w)


def test_blur_equals_torchvision_inside_the_border():
    image = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    for sigma in (0.7, 1.0, 2.5):
        r = math.ceil(3 * sigma)
        ours = gaussian_blur(image, sigma)
        theirs = tv_gaussian_blur(image, [2 * r + 1] * 2, [sigma, sigma])
        assert ours.shape == image.shape
        assert torch.allclose(ours[..., r:-r, r:-r], theirs[..., r:-r, r:-r], atol=1e-6)


def test_low_band_comes_from_the_reference_high_band_stays():
    """image = a + h (flat colour a, Nyquist texture h), reference = flat b at half size -> b + h."""
    a, b = torch.tensor([0.3, 0.5, 0.4]), torch.tensor([0.45, 0.4, 0.5])
    h = 0.05 * checkerboard(32, 32)
    image = a.view(1, 3, 1, 1) + h
    reference = b.view(1, 3, 1, 1).expand(1, 3, 16, 16)
    fixed = colour_fix(image, reference, sigma=1.5)
    # replicate padding keeps the Nyquist texture's blur ~0 only away from the border
    assert torch.allclose(fixed[..., 6:-6, 6:-6], (b.view(1, 3, 1, 1) + h)[..., 6:-6, 6:-6], atol=1e-4)
    assert torch.equal(colour_fix(image, reference, sigma=0), image)
    ramp = torch.linspace(0.2, 0.8, 32).expand(1, 3, 32, 32)  # a Gaussian keeps a ramp: the output is the reference
    fixed = colour_fix(torch.full_like(ramp, 0.5), ramp, sigma=2.0)
    assert torch.allclose(fixed[..., 6:-6], ramp[..., 6:-6], atol=1e-6)


def test_downscale_is_pils_bicubic_reduce():
    """D is the operator that made the protocol's low-res pictures (PIL bicubic x1/2), up to PIL's 8-bit rounding
    between its two passes (a few grey levels at sharp edges, 0.2 on average)."""
    image = Image.open(sorted((Path(__file__).parent.parent / "latentup" / "assets").glob("*.png"))[0]).convert("RGB")
    image = image.crop((0, 0, 256, 192))
    ours = downscale_x2(to_tensor(image))
    pil = to_tensor(image.resize((128, 96), Image.BICUBIC))
    assert (ours - pil).abs().max() <= 8 / 255 and (ours - pil).abs().mean() < 0.3 / 255


def test_back_projection_makes_the_output_downscale_to_the_picture():
    g = torch.Generator().manual_seed(0)
    sharp = gaussian_blur(torch.rand(1, 3, 64, 64, generator=g), 0.8)  # a picture's 2x, within [0, 1]
    picture = downscale_x2(sharp)
    assert torch.equal(back_project(sharp, picture, 10), sharp)  # consistent already: a fixed point
    assert torch.equal(back_project(sharp * 0.5, picture, 0), sharp * 0.5)
    drift = gaussian_blur(torch.rand(1, 3, 64, 64, generator=g), 2.0) - 0.5  # an error in the band the picture has
    guess = (sharp + drift).clamp(0, 1)
    errors = [(downscale_x2(back_project(guess, picture, k)) - picture).abs().max().item() for k in (0, 1, 10)]
    assert errors[0] > 0.05 and errors[1] < errors[0] / 3 and errors[2] < 2e-3, errors
    fixed = back_project(guess, picture, 10)
    assert (fixed - sharp).square().mean() < (guess - sharp).square().mean() / 10  # the truth again, nearly
    noisy = (sharp + 0.2 * torch.rand(1, 3, 64, 64, generator=g) - 0.1).clamp(0, 1)  # white noise: mostly above
    assert (downscale_x2(back_project(noisy, picture, 10)) - picture).abs().max() < 2e-3  # the picture's band
    with pytest.raises(ConfigError, match="back_projection must be"):
        Settings(back_projection=-1).validate()
    with pytest.raises(ConfigError, match="back_projection must be"):
        Settings(back_projection=2.5).validate()


def test_bad_sigma_is_one_clear_error():
    with pytest.raises(ConfigError, match="colour_fix must be >= 0"):
        colour_fix(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), sigma=-1)
    assert parse_setting("euler:4") == {"sampler": "euler", "steps": 4}
    assert parse_setting("euler_ancestral:8:1.5") == {"sampler": "euler_ancestral", "steps": 8, "colour_fix": 1.5}
    for bad, why in (("euler", "1 fields"), ("euler:four", "invalid literal"), ("euler:4:-1", "colour_fix must be"),
                     ("eul:4", "unknown sampler"), ("euler:4:1:2", "4 fields")):
        with pytest.raises(ConfigError, match=f"setting '{bad}'.*{why}.*expected sampler:steps"):
            parse_setting(bad)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """A tiny random text-free U-Net with TAESD; its metadata recommends euler 2 and colour_fix 1.5."""
    config = UNetConfig(channels=(32, 32, 64, 64), depths=(1,) * 4, cross_attention_dim=None, mapping_dim=64,
                        mapping_cond_dim=128, head_dim=32)
    torch.manual_seed(0)
    meta = {"recommended": {"sampler": "euler", "steps": 2, "colour_fix": 1.5}}
    path = save_upscaler(tmp_path_factory.mktemp("w") / "tiny.safetensors", UNet(config).state_dict(),
                         dataclasses.asdict(config), meta=meta)
    return Upscaler.from_pretrained(path, autoencoder=load_autoencoder("taesd"))


def test_pipeline_applies_the_fix_to_image_outputs(upscaler):
    assert upscaler.settings().colour_fix == 1.5 and upscaler.settings(colour_fix=0).colour_fix == 0
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = upscaler.autoencoder.decode(upscaler.upscale_latent(latent, seed=3))
    fixed = upscaler.upscale_latent_to_image(latent, seed=3)  # the recommended 1.5
    assert torch.equal(upscaler.upscale_latent_to_image(latent, seed=3, colour_fix=0), plain)
    assert torch.allclose(fixed, colour_fix(plain, upscaler.autoencoder.decode(latent), 1.5), atol=1e-6)
    assert not torch.allclose(fixed, plain, atol=1e-2)

    # image input: the reference is the input image itself, so a flat input gives a flat-mean output
    image = Image.new("RGB", (64, 64), (200, 60, 90))
    out = to_tensor(upscaler.upscale_image(image, seed=0, colour_fix=8.0))
    off = to_tensor(upscaler.upscale_image(image, seed=0, colour_fix=0))
    target = to_tensor(image).mean((-2, -1))
    assert (out.mean((-2, -1)) - target).abs().max() < 2 / 255 < (off.mean((-2, -1)) - target).abs().max()


def test_pipeline_back_projects_picture_inputs_only(upscaler):
    """upscale_pixels with back_projection: the recommended colour fix's output made to downscale to the picture;
    a latent input has no picture, so its image output is the same with or without."""
    g = torch.Generator().manual_seed(5)
    picture = gaussian_blur(torch.rand(1, 3, 64, 64, generator=g), 1.0)
    plain = upscaler.upscale_pixels(picture, seed=[2], colour_fix=0)
    projected = upscaler.upscale_pixels(picture, seed=[2], colour_fix=0, back_projection=10)
    assert torch.allclose(projected, back_project(plain, picture, 10), atol=1e-6)
    assert (downscale_x2(projected) - picture).abs().max() < 5e-3 < (downscale_x2(plain) - picture).abs().max()
    latent = torch.randn(1, 4, 8, 8, generator=g)
    assert torch.equal(upscaler.upscale_latent_to_image(latent, seed=3, back_projection=10),
                       upscaler.upscale_latent_to_image(latent, seed=3))


def test_colour_fix_cap_benchmark_rows(tmp_path, shared_dir):
    """benchmarks/colour_fix_cap.py on one 128-px image: its ceiling and fixed rows equal a recomputation."""
    import subprocess
    import sys

    from conftest import REPO
    from latentup.evaluation.metrics import psnr
    from latentup.evaluation.protocol import load_pair

    (tmp_path / "one").mkdir()
    source = sorted((shared_dir / "datasets" / "eval" / "Set5").glob("*.png"))[0]
    Image.open(source).convert("RGB").crop((0, 0, 128, 128)).save(tmp_path / "one" / "a.png")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "colour_fix_cap.py"), "--data-root", str(tmp_path),
                           "--set", "one", "--sigmas", "1", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = {cells[1].strip(): float(cells[2]) for cells in (line.split("|") for line in done.stdout.splitlines())
               if len(cells) == 5 and cells[2].strip()[:1].isdigit()}
    hr, lr = (x[None] for x in load_pair(tmp_path / "one" / "a.png"))
    taesd = load_autoencoder("taesd").eval()
    with torch.no_grad():
        decoded_lr, ceiling = (taesd.decode(taesd.encode(x, sample=False)) for x in (lr, hr))
    assert printed["ceiling"] == pytest.approx(psnr(ceiling, hr, y=True).item(), abs=0.006)
    assert printed["ceiling + fix 1"] == pytest.approx(psnr(colour_fix(ceiling, decoded_lr, 1.0), hr, y=True).item(),
                                                       abs=0.006)
    assert printed["ceiling + fix 1"] < printed["ceiling"]  # the decoded LR's low band is worse than the ceiling's
    assert printed["HR + fix 1"] < printed["HR + fix 2"]  # a wider sigma keeps more of the (perfect) image
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "colour_fix_cap.py"), "--data-root", str(tmp_path),
                          "--set", "one", "--sigmas", "-1"], capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: colour_fix must be >= 0"), bad.stderr
