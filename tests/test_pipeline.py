"""End to end against diffusers' StableDiffusionLatentUpscalePipeline on a random-weight pipeline folder."""

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, SHARED
from pipeline_fixtures import make_diffusers_pipeline

from latentup.errors import ConfigError, InputError

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
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *args, "progress=false"], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


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
    result = infer(*sampling_args(pipeline_dir), f"input={tmp_path / 'in.safetensors'}",
                   f"output={tmp_path / 'out.safetensors'}")
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


@pytest.mark.parametrize(("mode", "white"), [("I;16", 65535), ("I", 65535), ("F", 1.0)])
def test_high_bit_greyscale_comes_back_sixteen_bit(upscaler, mode, white):
    """The same grey levels as 16-bit, 32-bit or float input: the 8-bit result again, to 8-bit rounding, now as
    16-bit greyscale with more than 256 levels (the float result quantised to 65535 levels, no 8-bit step)."""
    grey = photo((64, 64)).convert("L")
    levels = np.asarray(grey, dtype=np.float64) / 255 * white
    high = Image.fromarray(levels.round().astype(np.uint16) if mode == "I;16" else
                           levels.round().astype(np.int32) if mode == "I" else levels.astype(np.float32))
    assert high.mode == mode
    out = upscaler.upscale_image(high, steps=2)
    eight = np.asarray(upscaler.upscale_image(grey, steps=2), dtype=np.float64)
    values = np.asarray(out)
    assert out.mode == "I;16" and values.shape == (128, 128) and len(np.unique(values)) > 256
    assert np.abs(values / 257 - eight).max() <= 1


def test_folder_and_list_use_seed_plus_index(upscaler, tmp_path):
    for name in ("a.png", "b.png"):  # the same picture twice: only the seeds differ
        photo((64, 64)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    singles = [np.asarray(upscaler.upscale_image(tmp_path / "a.png", seed=5 + i, steps=2)) for i in range(2)]
    assert np.abs(singles[0].astype(np.int16) - singles[1]).max() > 8
    for images in (tmp_path, [photo((64, 64)), tmp_path / "b.png"]):
        outs = upscaler(images, seed=5, steps=2)
        assert len(outs) == 2 and all(np.array_equal(np.asarray(o), s) for o, s in zip(outs, singles))


def test_upscale_images_equals_upscale_image_per_seed(upscaler):
    """A batch of two equals each image run alone with its seed, to float rounding: the batched convolutions and
    matrix products (oneDNN, the Winograd tile chunks) may sum in another order, so uint8 pixels may differ by 1."""
    images = [photo((64, 48)), photo((64, 48)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    settings = {"prompt": ["a photo", "a lighthouse"], "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7.5}
    batch = [np.asarray(o, dtype=np.int16) for o in upscaler.upscale_images(images, [3, 8], **settings)]
    for k, (image, seed) in enumerate(zip(images, (3, 8))):
        alone = {**settings, "prompt": settings["prompt"][k]}
        single = np.asarray(upscaler.upscale_image(image, seed=seed, **alone), dtype=np.int16)
        assert batch[k].shape == single.shape == (96, 128, 3)
        assert np.abs(batch[k] - single).max() <= 1 and np.mean(batch[k] != single) < 0.01
    swapped = np.asarray(upscaler.upscale_image(images[0], seed=8, **{**settings, "prompt": "a photo"}), dtype=np.int16)
    assert np.abs(swapped - batch[0]).max() > 8  # the seed matters
    with pytest.raises(InputError, match="needs images of one size, got 64x48, 64x64"):
        upscaler.upscale_images([images[0], photo((64, 64))], [1, 2], steps=1)
    with pytest.raises(ConfigError, match="seeds has 1 entries for a batch of 2"):
        upscaler.upscale_images(images, [1], steps=1)


def test_with_options_shares_the_weights_and_leaves_the_original(upscaler):
    from latentup.nn.winograd import Conv3x3

    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    before = upscaler.upscale_latent_to_image(latent, steps=2, seed=1)
    tiled = upscaler.with_options(vae_tile=8, winograd=False, unet_tile=16)
    assert all(a is b for a, b in zip(tiled.unet.parameters(), upscaler.unet.parameters()))
    assert all(a is b for a, b in zip(tiled.autoencoder.parameters(), upscaler.autoencoder.parameters()))
    assert tiled.speed.vae_tile == 8 and tiled.speed.compile is None and upscaler.speed.vae_tile == 128
    assert upscaler.autoencoder.tile_size == 128 and tiled.autoencoder.tile_size == 8
    flags = {m.winograd for m in upscaler.unet.modules() if isinstance(m, Conv3x3)}
    assert flags == {True} and {m.winograd for m in tiled.unet.modules() if isinstance(m, Conv3x3)} == {False}
    assert not torch.equal(tiled.upscale_latent_to_image(latent, steps=2, seed=1), before)  # its own tiles
    assert torch.equal(upscaler.upscale_latent_to_image(latent, steps=2, seed=1), before)  # the original unchanged


def test_progress_covers_the_job_and_times_it(upscaler, capsys):
    upscaler.upscale_image(photo((64, 64)), steps=2)
    assert capsys.readouterr().err == ""  # off by default for library calls
    upscaler.upscale_images([photo((64, 64))] * 2, [1, 2], progress=True, steps=2)
    err = capsys.readouterr().err
    # the bar totals encode, 2 steps and decode (tqdm redraws at most every 0.1 s, so a fast job may skip "4/4")
    assert "upscaled 2 images in" in err and "s per image)" in err and "0/4 [" in err


def test_channels_last_null_is_nchw_everywhere_as_documented(upscaler):
    """Speed's default keeps NCHW weights and activations on any device (no device branch), and the configs and the
    docstring say so (they said "on for cuda" after the default changed)."""
    from latentup.settings import Speed

    assert Speed().channels_last is None and upscaler.channels_last is False
    assert all(p.is_contiguous() for p in upscaler.unet.parameters())
    assert "None: off, NCHW on every device" in " ".join(Speed.__doc__.split())
    for config in ("infer/infer.yaml", "serve/serve.yaml"):
        line = next(ln for ln in (REPO / "configs" / config).read_text().splitlines() if ln.startswith("channels_last"))
        assert "null = off (NCHW" in line and "cuda, off" not in line


def test_exif_orientation_is_honoured(pipeline_dir, tmp_path):
    from latentup.imageio import load_image

    image = photo((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg").size == (64, 96)


def huge_png(path):
    """A PNG whose header claims 100000 x 100000 pixels (PIL refuses it before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["input=/nonexistent/photo.png"], "does not exist"),
        (["input={corrupt}"], "not a readable image"),
        (["input={huge}"], "too large to open (Image size (10000000000 pixels)"),
        (["weights=/nonexistent/weights", "input={photo}"], "do not exist"),
        (["weights={mismatched}", "input={photo}"], "do not fit"),
        (["input={photo}", "steps=0"], "steps must be >= 1"),
        (["input={photo}", "steps=abc"], "steps must be >= 1 and <= 1000 (an integer), got 'abc'"),
        (["input={photo}", "seed=-1"], "seed must be >= 0"),
        (["input={photo}", "cfg_scale=nan"], "cfg_scale must be >= 0 (a finite number"),
        (["input={photo}", "clip_skip=5"], "clip_skip must be an integer in 0..3"),
        (["input={photo}", "sampler=plms"], "unknown sampler"),
        (["input={photo}", "colour_fix=-1"], "colour_fix must be >= 0"),
        (["input={photo}", "vae_tile=0"], "vae_tile must be >= 1"),
        (["input={photo}", "compile=foo"], "use auto, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
        (["input={photo}", "download=maybe"], "download must be true, false or null"),
        (["input={photo}", "device=foo"], "device='foo' is not a torch device"),
        (["input={photo}", "output={file}/out.png"], "is not a writable folder (Not a directory)"),
        (["input={photo}", "output={tmp}/out.xyz"], "unknown image suffix"),
        (["input={latent}", "colour_fix=1"], "colour_fix acts on images"),
        (["input={nan}", "output={tmp}/out.safetensors"], "holds NaN or infinite values"),
        (["input={empty}", "output={tmp}/out.safetensors"], "has shape (1, 4, 0, 8): use a non-empty"),
        (["input={rgb}", "output={tmp}/out.safetensors"], "the model expects 4: use a latent made by the autoencoder"),
        (["input={latent}", "output={file}/out.safetensors"], "is not a writable folder"),
    ],
)
def test_cli_bad_input(pipeline_dir, tmp_path, args, message):
    """One `error:` line, exit status 2, and nothing written."""
    from latentup.imageio import save_latent
    from latentup.weights.single_file import save_upscaler

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "file").write_text("a file, not a folder")
    photo().save(tmp_path / "photo.png")
    save_upscaler(tmp_path / "mismatched.safetensors", {"conv_in.weight": torch.zeros(3, 3)},
                  {"channels": [32, 32, 64, 64]}, meta={"autoencoder": "taesd"})
    latents = {"latent": torch.zeros(1, 4, 8, 8), "nan": torch.full((1, 4, 8, 8), float("nan")),
               "empty": torch.zeros(1, 4, 0, 8), "rgb": torch.zeros(1, 3, 8, 8)}
    for name, latent in latents.items():
        save_latent(latent, tmp_path / f"{name}.safetensors")
    paths = {"corrupt": tmp_path / "corrupt.png", "photo": tmp_path / "photo.png", "huge": huge_png(tmp_path / "x.png"),
             "mismatched": tmp_path / "mismatched.safetensors", "file": tmp_path / "file", "tmp": tmp_path,
             **{name: tmp_path / f"{name}.safetensors" for name in latents}}
    before = sorted(tmp_path.rglob("*"))
    weights = [] if any(a.startswith("weights=") for a in args) else [f"weights={pipeline_dir}"]
    output = [] if any(a.startswith("output=") for a in args) else [f"output={tmp_path / 'out.png'}"]
    result = infer(*weights, *[a.format(**paths) for a in args], *output)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_folder_checks_every_target_first(pipeline_dir, tmp_path):
    """A folder run whose second target is an existing folder fails before the first image is written."""
    for name in ("a.png", "b.png"):
        photo((64, 64)).save(tmp_path / name)
    (tmp_path / "out" / "b.png").mkdir(parents=True)
    result = infer(f"weights={pipeline_dir}", f"input={tmp_path}", f"output={tmp_path / 'out'}", "steps=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"output {tmp_path / 'out' / 'b.png'} is an existing folder" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.png"]


@pytest.mark.parametrize(
    "given,message",
    [
        ({"steps": "abc"}, "steps must be >= 1 and <= 1000 (an integer), got 'abc'"),
        ({"steps": 1.5}, "steps must be >= 1 and <= 1000 (an integer), got 1.5"),
        ({"steps": 10**11}, "steps must be >= 1 and <= 1000"),
        ({"steps": True}, "steps must be >= 1"),
        ({"seed": "abc"}, "seed must be >= 0 and <= 9223372036854775807 (an integer), got 'abc'"),
        ({"seed": 1e30}, "seed must be >= 0"),
        ({"seed": 2**63}, "seed must be >= 0 and <= 9223372036854775807"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": [1, -2]}, "seed must be >= 0"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be >= 0 (a finite number"),
        ({"cfg_scale": float("inf")}, "cfg_scale must be >= 0"),
        ({"cfg_scale": -1}, "cfg_scale must be >= 0"),
        ({"cfg_scale": "7"}, "cfg_scale must be >= 0"),
        ({"colour_fix": "abc"}, "colour_fix must be >= 0 (a finite number; a blur sigma"),
        ({"colour_fix": float("nan")}, "colour_fix must be >= 0"),
        ({"noise_level": float("inf")}, "noise_level must be >= 0"),
        ({"noise_level": "abc"}, "noise_level must be >= 0"),
        ({"clip_skip": -1}, "clip_skip must be >= 0 (an integer), got -1: 0 or 1 = last CLIP layer"),
        ({"clip_skip": "2"}, "clip_skip must be >= 0"),
        ({"prompt": 123}, "prompt must be text or a list of texts"),
        ({"negative_prompt": ["ok", None]}, "negative_prompt must be text or a list of texts"),
    ],
)
def test_settings_reject_bad_values(given, message):
    from latentup.errors import ConfigError
    from latentup.settings import Settings

    with pytest.raises(ConfigError) as error:
        Settings(**given).validate()
    assert message in str(error.value)


def test_settings_accept_the_extremes():
    from latentup.settings import MAX_SEED, MAX_STEPS, Settings

    Settings(steps=MAX_STEPS, seed=MAX_SEED, cfg_scale=7.5, clip_skip=0, colour_fix=1, noise_level=0.5).validate()
    Settings(steps=1, seed=[0, MAX_SEED], prompt=["a", "b"], cfg_scale=0).validate()


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"vae_tile": 0}, "vae_tile must be >= 1 (an integer), got 0"),
        ({"vae_tile": "abc"}, "vae_tile must be >= 1"),
        ({"unet_tile": 0}, "unet_tile must be >= 1"),
        ({"compile": "foo"}, "unknown compile mode 'foo': use auto, default, reduce-overhead"),
        ({"winograd": "abc"}, "winograd must be true, false or null"),
        ({"channels_last": "abc"}, "channels_last must be true, false or null"),
    ],
)
def test_speed_knobs_are_checked(knobs, message):
    from latentup.errors import ConfigError
    from latentup.settings import check_speed

    with pytest.raises(ConfigError) as error:
        check_speed(**knobs)
    assert message in str(error.value)


def test_device_is_checked():
    from latentup.devices import resolve_device
    from latentup.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device='foo' is not a torch device: use cpu, cuda"):
        resolve_device("foo")
    with pytest.raises(ConfigError, match="device=meta is not supported"):
        resolve_device("meta")
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"device=cuda:{count} but .* available: use device=cpu or device=auto"):
        resolve_device(f"cuda:{count}")


def test_upscaler_checks_before_work(upscaler):
    """Knobs and settings that need the weights to check: bad ones fail before any sampling."""
    from latentup.autoencoders.taesd import TAESD
    from latentup.errors import ConfigError, InputError
    from latentup.pipeline import Upscaler

    with pytest.raises(ConfigError, match="unet_tile must be a multiple of 8 for these weights, got 12"):
        upscaler.with_options(unet_tile=12)
    with pytest.raises(ConfigError, match=r"clip_skip must be an integer in 0\.\.3 \(got 5\)"):
        upscaler.settings(clip_skip=5)
    with pytest.raises(InputError, match="latent has 16 channels but the model expects 4: use a latent made by"):
        upscaler.upscale_latent(torch.zeros(1, 16, 8, 8), steps=1)
    with pytest.raises(ConfigError, match="the autoencoder makes 16-channel latents but these weights expect 4"):
        Upscaler(upscaler.unet, TAESD("sd3"), upscaler.text)
    with pytest.raises(ConfigError, match="download must be true, false or null"):
        Upscaler.from_pretrained("/nonexistent", download="maybe")


@pytest.mark.parametrize(
    "latent,message",
    [
        (torch.full((1, 4, 8, 8), float("nan")), "holds NaN or infinite values"),
        (torch.full((4, 8, 8), float("-inf")), "holds NaN or infinite values"),
        (torch.zeros(1, 4, 0, 8), "has shape (1, 4, 0, 8): use a non-empty"),
        (torch.zeros(0, 4, 8, 8), "has shape (0, 4, 8, 8): use a non-empty"),
    ],
)
def test_load_latent_rejects_unusable_values(tmp_path, latent, message):
    from latentup.errors import InputError
    from latentup.imageio import load_latent

    save_file({"latent": latent}, tmp_path / "bad.safetensors")
    with pytest.raises(InputError) as error:
        load_latent(tmp_path / "bad.safetensors")
    assert message in str(error.value)


def test_load_image_refuses_a_decompression_bomb(tmp_path):
    from latentup.errors import InputError
    from latentup.imageio import load_image

    with pytest.raises(InputError, match=r"x.png is too large to open \(Image size \(10000000000 pixels\).*: downs"):
        load_image(huge_png(tmp_path / "x.png"))
