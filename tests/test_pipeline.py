"""End to end against diffusers' StableDiffusionLatentUpscalePipeline on a random-weight pipeline folder."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, SHARED
from pipeline_fixtures import make_diffusers_pipeline

PROMPT, NEGATIVE, SEED, STEPS, CFG = "a photo of a lighthouse", "blurry, grainy", 3, 6, 7.5


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_diffusers_pipeline(tmp_path_factory.mktemp("diffusers"))


@pytest.fixture(scope="module")
def reference(pipeline_dir):
    from diffusers import StableDiffusionLatentUpscalePipeline

    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *args, "progress=false"], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def sampling_args(pipeline_dir):
    return [f"weights={pipeline_dir}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", f"seed={SEED}",
            f"steps={STEPS}", f"cfg_scale={CFG}", "sampler=euler", "schedule=log_linear"]


def photo(size=(96, 64)) -> Image.Image:
    return Image.open(SHARED / "datasets/eval/Set5/baby.png").convert("RGB").resize(size, Image.BICUBIC)


def test_cli_latent_equals_diffusers(pipeline_dir, reference, tmp_path):
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(5))
    save_file({"latent": latent}, tmp_path / "in.safetensors")
    expected = reference(prompt=PROMPT, negative_prompt=NEGATIVE, image=latent, num_inference_steps=STEPS,
                         guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    result = infer(*sampling_args(pipeline_dir), f"input={tmp_path / 'in.safetensors'}", f"output={tmp_path / 'out.safetensors'}")
    assert result.returncode == 0, result.stderr
    ours = load_file(tmp_path / "out.safetensors")["latent"]
    assert ours.shape == (1, 4, 16, 24)
    delta = (ours - expected).abs().max().item()
    assert delta <= 2e-3, delta
    assert expected.abs().max() > 1  # a real output, not a degenerate one


def test_cli_photo_equals_diffusers(pipeline_dir, reference, tmp_path):
    image = photo()
    image.save(tmp_path / "in.png")
    expected = reference(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, num_inference_steps=STEPS,
                         guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED)).images[0]
    result = infer(*sampling_args(pipeline_dir), f"input={tmp_path / 'in.png'}", f"output={tmp_path / 'out.png'}")
    assert result.returncode == 0, result.stderr
    ours = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.int16)
    assert ours.shape == (128, 192, 3)
    assert np.abs(ours - np.asarray(expected, dtype=np.int16)).max() <= 2


def test_api_batch_seeds_are_per_sample(pipeline_dir, reference):
    from latentup.pipeline import Upscaler

    upscaler = Upscaler.from_pretrained(pipeline_dir, dtype="float32")
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = upscaler.upscale_latent(latent, prompt=PROMPT, seed=[11, 12], steps=4, cfg_scale=0.0)
    expected = reference(prompt=[PROMPT] * 2, image=latent, num_inference_steps=4, guidance_scale=0.0,
                         generator=[torch.Generator().manual_seed(s) for s in (11, 12)], output_type="latent").images
    assert (ours - expected).abs().max().item() <= 2e-3
    single = upscaler.upscale_latent(latent[1:], prompt=PROMPT, seed=12, steps=4, cfg_scale=0.0)
    # equal up to float rounding, which depends on the batch size (e.g. the Winograd chunks): relative 1e-5
    assert (single - ours[1:]).abs().max().item() <= 1e-5 * ours.abs().max().item()


@pytest.fixture(scope="module")
def upscaler(pipeline_dir):
    from latentup.pipeline import Upscaler

    return Upscaler.from_pretrained(pipeline_dir, dtype="float32")


def reflect_padded(image: Image.Image) -> Image.Image:
    """The size rule done by hand: RGB pixels reflected (edge not repeated) at the bottom / right to sides that are
    multiples of 32 (4 latent px) and >= 64."""
    w, h = image.size
    pad = [(0, max(64, -(-h // 32) * 32) - h), (0, max(64, -(-w // 32) * 32) - w), (0, 0)]
    return Image.fromarray(np.pad(np.asarray(image.convert("RGB")), pad, mode="reflect"))


@pytest.mark.parametrize("size,mode", [((70, 45), "RGB"), ((64, 64), "RGBA"), ((40, 72), "L")])
def test_any_size_and_mode(upscaler, size, mode):
    """Colour: the upscale of the reflect-padded RGB pixels, cropped (greyscale back to L); alpha: bicubic 2x."""
    image = photo(size).convert(mode)
    alpha = photo(size).getchannel("G")
    if mode == "RGBA":
        image.putalpha(alpha)
    out = upscaler.upscale_image(image, steps=2)
    assert out.size == (2 * size[0], 2 * size[1]) and out.mode == mode
    padded = upscaler.upscale_image(reflect_padded(image), steps=2).crop((0, 0, *out.size))
    got = np.asarray(out)
    assert np.array_equal(got[..., :3] if mode == "RGBA" else got, np.asarray(padded.convert(mode.rstrip("A"))))
    if mode == "RGBA":
        assert np.array_equal(got[..., 3], np.asarray(alpha.resize(out.size, Image.BICUBIC)))


def test_folder_and_list_use_seed_plus_index(upscaler, tmp_path):
    for name in ("a.png", "b.png"):  # the same picture twice: only the seeds differ
        photo((64, 64)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    singles = [np.asarray(upscaler.upscale_image(tmp_path / "a.png", seed=5 + i, steps=2)) for i in range(2)]
    assert np.abs(singles[0].astype(np.int16) - singles[1]).max() > 8
    for images in (tmp_path, [photo((64, 64)), tmp_path / "b.png"]):
        outs = upscaler(images, seed=5, steps=2)
        assert len(outs) == 2 and all(np.array_equal(np.asarray(o), s) for o, s in zip(outs, singles))


def test_exif_orientation_is_honoured(pipeline_dir, tmp_path):
    from latentup.imageio import load_image

    image = photo((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg").size == (64, 96)


@pytest.mark.parametrize(
    "args,message",
    [
        (["input=/nonexistent/photo.png"], "does not exist"),
        (["input={corrupt}"], "not a readable image"),
        (["weights=/nonexistent/weights", "input={photo}"], "do not exist"),
        (["weights={mismatched}", "input={photo}"], "do not fit"),
        (["input={photo}", "steps=0"], "steps must be >= 1"),
        (["input={photo}", "sampler=plms"], "unknown sampler"),
        (["input={photo}", "colour_fix=-1"], "colour_fix must be >= 0"),
        (["input={latent}", "colour_fix=1"], "colour_fix acts on images"),
    ],
)
def test_cli_bad_input(pipeline_dir, tmp_path, args, message):
    from latentup.imageio import save_latent
    from latentup.weights.single_file import save_upscaler

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    photo().save(tmp_path / "photo.png")
    save_upscaler(tmp_path / "mismatched.safetensors", {"conv_in.weight": torch.zeros(3, 3)},
                  {"channels": [32, 32, 64, 64]}, meta={"autoencoder": "taesd"})
    save_latent(torch.zeros(1, 4, 8, 8), tmp_path / "latent.safetensors")
    paths = {"corrupt": tmp_path / "corrupt.png", "photo": tmp_path / "photo.png",
             "mismatched": tmp_path / "mismatched.safetensors", "latent": tmp_path / "latent.safetensors"}
    weights = [] if any(a.startswith("weights=") for a in args) else [f"weights={pipeline_dir}"]
    output = tmp_path / "out.png"
    result = infer(*weights, *[a.format(**paths) for a in args], f"output={output}")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not output.exists() and not list(tmp_path.glob(".out*"))
