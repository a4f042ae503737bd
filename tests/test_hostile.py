"""Issue 21's attacks on the entry points: nothing lost, nothing silently wrong, one line for each refusal."""

import dataclasses
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, SHARED
from latentup.cli import quote
from latentup.errors import InputError, LatentupError, WeightsMismatchError


@pytest.fixture(scope="module")
def infer_script():
    """infer.py as a module, to run it on composed configs in this process."""
    spec = importlib.util.spec_from_file_location("infer_script", REPO / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def infer_cfg(*overrides, **paths):
    """The infer config at one step without progress, with ``overrides`` and path values (quoted as the command line
    does)."""
    with initialize_config_dir(str(REPO / "configs" / "infer"), version_base=None):
        return compose("infer", ["progress=false", "steps=1", *overrides,
                                 *(f"{k}={quote(str(v))}" for k, v in paths.items())])


def photo(path: Path, size=(40, 32)) -> Path:
    Image.open(SHARED / "datasets/eval/Set5/baby.png").convert("RGB").resize(size).save(path)
    return path


def rgb_png(path: Path, width: int, height: int, depth: int = 8, scanlines: bytes = b"") -> Path:
    """A PNG of width x height RGB pixels, ``depth`` bits per sample, holding ``scanlines`` (none: a header only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b""))
    return path


# 1. Data loss


@pytest.mark.parametrize("case", ["png", "jpg", "spelled differently", "hard link", "folder"])
def test_an_input_is_never_overwritten(infer_script, tmp_path, case):
    source = photo(tmp_path / ("same.jpg" if case == "jpg" else "same.png"))
    output = {"spelled differently": tmp_path / "sub" / ".." / "same.png", "folder": tmp_path}.get(case, source)
    if case == "spelled differently":
        (tmp_path / "sub").mkdir()
    if case == "hard link":
        output = tmp_path / "link.png"
        os.link(source, output)
    before = source.read_bytes()
    with pytest.raises(InputError, match="is the input (file|folder) .*: choose another output"):
        infer_script.run(infer_cfg(input=tmp_path if case == "folder" else source, output=output))
    assert source.read_bytes() == before


def test_an_existing_output_is_replaced_only_with_overwrite(infer_script, tmp_path):
    source, output = photo(tmp_path / "in.png"), tmp_path / "out.png"
    output.write_bytes(b"someone else's file")
    with pytest.raises(InputError, match="out.png exists: pass overwrite=true to replace it"):
        infer_script.run(infer_cfg(input=source, output=output))
    assert output.read_bytes() == b"someone else's file"
    infer_script.run(infer_cfg("overwrite=true", input=source, output=output))
    assert Image.open(output).size == (80, 64)


def test_a_file_written_meanwhile_is_never_replaced(tmp_path):
    """Two runs writing one name: the second to finish refuses and leaves the first's file whole."""
    from latentup.atomic import write_atomic

    target = tmp_path / "x2.png"

    def slow_write(tmp):
        target.write_bytes(b"the other run's result")  # it finished first
        Path(tmp).write_bytes(b"this run's result")

    with pytest.raises(InputError, match="x2.png exists .*left as it is"):
        write_atomic(target, slow_write, overwrite=False)
    assert target.read_bytes() == b"the other run's result"
    assert [p.name for p in tmp_path.iterdir()] == ["x2.png"]  # no temporary left


def test_two_runs_never_share_an_output_folder(tmp_path):
    from latentup.atomic import folder_lock

    with folder_lock(tmp_path / "out"):
        with pytest.raises(InputError, match="is being written by another run"), folder_lock(tmp_path / "out"):
            pass
    assert not (tmp_path / "out").exists()  # created for the run, removed again while empty


# 2. Silently wrong output


def sixteen_bit_ramp(path: Path) -> Path:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(path)  # a 16-bit greyscale PNG
    return path


def test_sixteen_bit_greyscale_is_mapped_by_its_own_white(tmp_path):
    from latentup.imageio import load_image, split_alpha, to_tensor

    image = load_image(sixteen_bit_ramp(tmp_path / "ramp.png"))
    assert image.mode.startswith("I")
    pixels = to_tensor(split_alpha(image)[0])
    assert pixels.shape == (1, 3, 64, 64)
    assert pixels.min() == 0 and pixels.max() == 1 and abs(pixels.mean().item() - 0.5) < 1e-3


@pytest.mark.parametrize(("suffix", "mode", "white"), [(".png", "I;16", 65535), (".tif", "I;16", 65535),
                                                   (".jpg", "L", 255), (".webp", "RGB", 255)])
def test_sixteen_bit_greyscale_comes_back_at_its_depth_where_the_format_holds_it(infer_script, tmp_path, suffix,
                                                                                  mode, white):
    """16 bits in, 16 bits out (PNG, TIFF: more than 256 levels, no 8-bit step between); 8-bit where the format
    holds no more (JPEG; WEBP stores RGB), never clipped (it was 96 % white)."""
    source = sixteen_bit_ramp(tmp_path / "ramp.png")
    infer_script.run(infer_cfg(input=source, output=tmp_path / f"out{suffix}"))
    out = Image.open(tmp_path / f"out{suffix}")
    values = np.asarray(out)
    assert out.mode == mode and values.shape[:2] == (128, 128)
    if white == 65535:
        assert len(np.unique(values)) > 1000
    grey = (values if values.ndim == 2 else values.mean(-1)) / white
    ramp = np.interp(np.arange(128) / 2 - 0.25, np.arange(64), np.linspace(0, 1, 64))  # the input's, 2x (centres)
    assert np.abs(grey - ramp).mean() < 0.01 and np.abs(grey.mean(0) - ramp).max() < 0.03


def test_sixteen_bit_rgb_is_read_at_eight_bits_by_pillow(tmp_path):
    """A 48-bit RGB PNG: Pillow has no 16-bit RGB mode and keeps each sample's high byte (the right brightness at
    8-bit precision), so it is upscaled and written as 8-bit RGB (imageio's module docstring)."""
    from latentup.imageio import load_image, split_alpha, to_tensor

    samples = np.array([[0, 255, 256], [32896, 65280, 65535]], dtype=">u2")  # one row of two pixels
    image = load_image(rgb_png(tmp_path / "rgb48.png", 2, 1, depth=16, scanlines=b"\x00" + samples.tobytes()))
    assert image.mode == "RGB" and np.asarray(image).tolist() == [[[0, 0, 1], [128, 255, 255]]]
    assert split_alpha(image)[0].mode == "RGB" and to_tensor(image).max() == 1


def test_non_finite_weights_are_refused_at_load():
    from latentup.weights.strict import load_strict

    state = {"weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "bias": torch.zeros(2)}
    with pytest.raises(WeightsMismatchError, match=r"NaN or infinite values in 1 tensors \(weight\)"):
        load_strict(torch.nn.Linear(2, 2), state)


def test_non_finite_results_are_never_written():
    """Images become PIL images only through from_tensor / to_pil (NaN would turn black), also at 16 bits; infer.py
    checks latents the same way."""
    from latentup.imageio import check_finite, from_tensor, to_pil

    with pytest.raises(LatentupError, match="upscaled image holds NaN or infinite values"):
        to_pil(torch.full((1, 3, 8, 8), float("nan")))
    for mode in ("RGB", "I;16"):
        with pytest.raises(LatentupError, match="upscaled image holds NaN or infinite values"):
            from_tensor(torch.full((3, 8, 8), float("inf")), None, mode)
    with pytest.raises(LatentupError, match="upscaled latent holds NaN"):
        check_finite(torch.tensor([0.0, float("inf")]), "upscaled latent")


@pytest.mark.parametrize("kind", ["image", "folder", "latent"])
@pytest.mark.parametrize("progress", [True, False])
def test_one_timing_line_per_upscale(infer_script, tmp_path, capsys, kind, progress):
    """stdout names what was written; the time per image is the pipeline's closing line on stderr, printed once per
    upscale with progress=true (infer.py printed a second one) and never without (issue 20)."""
    if kind == "latent":
        source = tmp_path / "in.safetensors"
        save_file({"latent": torch.randn(1, 4, 4, 5)}, source)
    else:
        source = photo(tmp_path / "in.png") if kind == "image" else tmp_path / "in"
    if kind == "folder":
        source.mkdir()
        photo(source / "a.png"), photo(source / "b.png")
    output = tmp_path / ("out" if kind == "folder" else f"out{source.suffix}")
    infer_script.run(infer_cfg(f"progress={progress}", input=source, output=output))
    out, err = capsys.readouterr()
    upscales, noun = (2, "image") if kind == "folder" else (1, "latent" if kind == "latent" else "image")
    timings = re.findall(r"upscaled 1 (\w+) in \d+\.\d+ s \(\d+\.\d+ s per \1\)", err)
    assert timings == ([noun] * upscales if progress else []) and len(re.findall(r"\d s\b", err)) == 2 * len(timings)
    assert out.count("wrote ") == (upscales + 1 if kind == "folder" else 1) and not re.search(r"\d s\b", out)


# 3. Resources without bounds


def test_the_pixel_cap_is_read_from_the_header(infer_script, tmp_path):
    big = rgb_png(tmp_path / "big.png", 12000, 12000)
    with pytest.raises(InputError, match=r"big.png is 12000x12000 = 144000000 pixels, over max_pixels=4194304"):
        infer_script.run(infer_cfg(input=big))
    with pytest.raises(InputError, match="over max_pixels=100"):
        infer_script.run(infer_cfg("max_pixels=100", input=photo(tmp_path / "small.png")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "small.png"]


# 6. Evaluation resume


def test_a_torn_row_is_recomputed_never_averaged(tmp_path):
    from latentup.evaluation.report import append_records, read_records, summarize

    path = tmp_path / "per_image.csv"
    rows = [{"set": "Set5", "image": name, "row": "latent-nearest", "width": 64, "height": 64, "psnr_y": psnr,
             "psnr_rgb": psnr, "ssim_y": 0.5, "ssim_rgb": 0.5, "lpips": 0.25}
            for name, psnr in (("a", 20.25), ("b", 20.75))]
    append_records(path, rows)
    path.write_bytes(path.read_bytes()[:-20])  # a kill cut the last row after "20.7"
    assert [r["image"] for r in read_records(path)] == ["a"]  # b is missing: it gets computed again
    append_records(path, rows[1:])
    records = read_records(path)
    assert [r["image"] for r in records] == ["a", "b"]
    assert summarize(records, ["Set5"], ["latent-nearest"])["Set5"]["rows"]["latent-nearest"]["psnr_y"] == 20.5


@pytest.mark.parametrize("line", ["Set5,c,latent-nearest,64,64,oops,1,1,1,1", "Set5,c,latent-nearest,64,-1,1,1,1,1,1",
                                  "Set5,c,latent-nearest,64", "Set5,c,latent-nearest,64,64,1,1,1,1,1,9,9"])
def test_an_inconsistent_row_is_left_out(tmp_path, line):
    from latentup.evaluation.report import FIELDS, read_records

    path = tmp_path / "per_image.csv"
    path.write_text(",".join(FIELDS[:10]) + "\r\n" + line + "\r\n")
    assert read_records(path) == []


# 7. Unclear messages


@pytest.fixture(scope="module")
def tiny_upscaler_file(tmp_path_factory):
    from latentup.nn.unet import UNet, UNetConfig
    from latentup.weights.single_file import save_upscaler

    config = UNetConfig(channels=(32, 32), depths=(1, 1), self_attn=(False, False), cross_attn=(False, False),
                        cross_attention_dim=None, head_dim=32, mapping_dim=64, mapping_cond_dim=0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_upscaler(path, UNet(config).state_dict(), dataclasses.asdict(config), meta={"autoencoder": "taesd"})
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"channels": [65536, 65536]}, r"channels \(65536, 65536\) != \(32, 32\)"),
    ({"channels": [-1, -1]}, "the U-Net config does not match the tensors"),
    ({"depths": [10**9, 1]}, r"depths \(1000000000, 1\) != \(1, 1\)"),
    ({"mapping_dim": 63}, "unusable U-Net config .*mapping_dim even"),
    ({"bogus": 1}, "unusable U-Net config .*unexpected keyword argument 'bogus'"),
])
def test_tampered_metadata_is_one_line(tiny_upscaler_file, tmp_path, change, message):
    from latentup.weights.sources import resolve_weights

    with safe_open(str(tiny_upscaler_file), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["unet_config"]) | change
    save_file(tensors, tmp_path / "tampered.safetensors", metadata={**metadata, "unet_config": json.dumps(config)})
    with pytest.raises(WeightsMismatchError, match=message) as error:
        resolve_weights(tmp_path / "tampered.safetensors")
    assert "\n" not in str(error.value) and "export or download the weights again" in str(error.value)


def test_a_folder_named_like_an_image(tmp_path):
    from latentup.imageio import list_images, load_image

    photo(tmp_path / "a.png")
    (tmp_path / "x.png").mkdir()
    assert list_images(tmp_path) == [tmp_path / "a.png"]
    with pytest.raises(InputError, match="x.png is a folder, not an image"):
        load_image(tmp_path / "x.png")


def test_odd_names_through_the_real_cli(tmp_path):
    """Names with ``${...}``, commas and quotes are files like any other."""
    source = photo(tmp_path / "in ${oc.env:HOME}, 'q'.png")
    done = subprocess.run([sys.executable, str(REPO / "infer.py"), f"input={source}", "output=out ${x}, 2.png",
                           "steps=1", "progress=false"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "out ${x}, 2.png").size == (80, 64)


# 8. Leftovers


def test_partial_checkpoints_of_a_killed_run_are_removed(tmp_path):
    from latentup.atomic import stale_temporaries
    from latentup.training.callbacks import RemovePartialCheckpoints

    killed = subprocess.run([sys.executable, "-c", "import os; from latentup.atomic import write_atomic; "
                             f"write_atomic({str(tmp_path / 'step0000250.ckpt')!r}, lambda tmp: os._exit(9))"],
                            cwd=REPO, timeout=120)
    assert killed.returncode == 9
    (tmp_path / "last.ckpt").write_bytes(b"kept")
    (tmp_path / "step0000100.ckpt").write_bytes(b"kept")
    partial = stale_temporaries(tmp_path, ".ckpt")
    assert len(partial) == 1 and partial[0].name.startswith(".step0000250.")
    trainer = SimpleNamespace(is_global_zero=True, checkpoint_callbacks=[SimpleNamespace(dirpath=str(tmp_path))])
    RemovePartialCheckpoints().on_fit_start(trainer, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step0000100.ckpt"]
