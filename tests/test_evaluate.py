"""Evaluation protocol, loop, outputs and CLI; the shared-set rows against spec/ANCHORS.md (slow)."""

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, SHARED, SPEC
from latentup.autoencoders import load_autoencoder
from latentup.colour_fix import colour_fix
from latentup.errors import ConfigError, InputError, WeightsNotFoundError
from latentup.evaluation.metrics import ImageMetrics
from latentup.evaluation.protocol import (BASELINES, bicubic2x, check_align, crop_box, list_set_images, load_pair,
                                          reconstruct)
from latentup.evaluation.report import read_records
from latentup.evaluation.run import evaluate, load_models

EVAL = SHARED / "datasets" / "eval"


@pytest.fixture(scope="module")
def taesd():
    return load_autoencoder("taesd").float().eval()


@pytest.fixture(scope="module")
def metrics():
    return ImageMetrics()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A set 'tiny' of three small crops of Set5 photos: two 64x64 HR crops and one 128x64, plus SOURCE.txt."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "tiny"
    folder.mkdir()
    for name, source, size in (("a.png", "baby.png", (64, 64)), ("b.png", "bird.png", (100, 90)),
                               ("c.png", "butterfly.png", (140, 80))):
        Image.open(EVAL / "Set5" / source).convert("RGB").crop((80, 80, 80 + size[0], 80 + size[1])).save(folder / name)
    (folder / "SOURCE.txt").write_text("crops of Set5\n")
    return root


class StandIn:
    """A model row: the decoded bicubic x2 of the latent plus seeded noise (so seeds show in the output); records its
    calls."""

    def __init__(self, autoencoder):
        self.autoencoder, self.calls = autoencoder, []

    def __call__(self, z, seed):
        self.calls.append(list(seed))
        noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seed])
        return self.autoencoder.decode(bicubic2x(z + 0.2 * noise.to(z)))


def test_crop_and_listing(tmp_path, tiny_root):
    assert crop_box(500, 333, 64) == (26, 6, 474, 326)  # (W - 448) // 2, (H - 320) // 2
    assert crop_box(481, 320, 64) == (16, 0, 464, 320)
    assert [p.name for p in list_set_images(tiny_root / "tiny")] == ["a.png", "b.png", "c.png"]
    with pytest.raises(InputError, match="does not exist"):
        list_set_images(tmp_path / "nope")
    with pytest.raises(InputError, match="no images"):
        list_set_images(tmp_path)
    with pytest.raises(InputError, match="smaller than align"):
        crop_box(63, 500, 64)
    with pytest.raises(ConfigError):
        check_align(40)


def test_pair_follows_the_protocol():
    hr, lr = load_pair(EVAL / "Set14" / "bridge.png")  # greyscale: three equal channels
    image = Image.open(EVAL / "Set14" / "bridge.png").convert("RGB")
    box = crop_box(*image.size, 64)
    expected_lr = image.crop(box).resize((hr.shape[2] // 2, hr.shape[1] // 2), Image.BICUBIC)
    assert hr.shape[1:] == (box[3] - box[1], box[2] - box[0]) and lr.shape[1:] == (hr.shape[1] // 2, hr.shape[2] // 2)
    assert torch.equal(hr[0], hr[1]) and torch.equal(hr[0], hr[2])
    assert torch.equal((lr * 255).round().byte().permute(1, 2, 0), torch.from_numpy(np.array(expected_lr)))


def test_rows(taesd):
    hr, lr = load_pair(EVAL / "Set5" / "head.png")
    hr, lr = hr[None, :, :64, :64], lr[None, :, :32, :32]
    rows = reconstruct(taesd, hr, lr, {"model": lambda z: taesd.decode(bicubic2x(z))})
    assert list(rows) == ["model", *BASELINES]
    assert all(r.shape == hr.shape and r.dtype == torch.float32 for r in rows.values())
    assert torch.equal(rows["model"], rows["latent-bicubic"])
    assert torch.equal(rows["pixel-bicubic-of-LR"], F.interpolate(lr, scale_factor=2, mode="bicubic").clamp(0, 1))
    with torch.no_grad():
        assert torch.equal(rows["ceiling"], taesd.decode(taesd.encode(hr)))
        z = taesd.encode(lr)
        assert torch.equal(rows["latent-nearest"], taesd.decode(F.interpolate(z, scale_factor=2, mode="nearest")))
        assert torch.equal(rows["pixel-bicubic-of-decoded-LR"], bicubic2x(taesd.decode(z)).clamp(0, 1))


def _run(root, folder, taesd, metrics, model, **kw):
    return evaluate(taesd, {"tiny": root / "tiny"}, folder, metrics, {"model": model}, progress=False, **kw)


def test_evaluate_outputs_resume_and_determinism(tmp_path, tiny_root, taesd, metrics):
    model = StandIn(taesd)
    summary = _run(tiny_root, tmp_path / "a", taesd, metrics, model, batch_size=2, grids=1)
    assert sorted(model.calls) == [[0, 1], [2]]  # a, b share a size (one batch); image i uses seed + i
    records = read_records(tmp_path / "a" / "per_image.csv")
    assert len(records) == 3 * 6 and {r["row"] for r in records} == {"model", *BASELINES}
    assert {(r["image"], r["width"], r["height"]) for r in records} == {("a.png", 64, 64), ("b.png", 64, 64),
                                                                         ("c.png", 128, 64)}
    means = summary["tiny"]["rows"]["ceiling"]
    assert means["psnr_y"] == pytest.approx(sum(r["psnr_y"] for r in records if r["row"] == "ceiling") / 3)
    assert list(summary["tiny"]["rows"]) == ["model", *BASELINES] and summary["tiny"]["images"] == 3
    table = (tmp_path / "a" / "results.md").read_text()
    assert table.index("| model |") < table.index("| ceiling |") and "2-px border" in table
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["sets"]["tiny"]["rows"]["model"]["lpips"] > 0
    assert sorted(p.name for p in (tmp_path / "a" / "grids" / "tiny").iterdir()) == ["a.png"]
    with Image.open(tmp_path / "a" / "grids" / "tiny" / "a.png") as grid:
        assert grid.width == 8 * 64 + 7 * 4  # LR | 4 baselines | model | ceiling | HR

    # Batching does not change results: every image has its own seed.
    _run(tiny_root, tmp_path / "b", taesd, metrics, StandIn(taesd), batch_size=1, grids=0)
    again = {(r["image"], r["row"]): r for r in read_records(tmp_path / "b" / "per_image.csv")}
    assert all(r["lpips"] == pytest.approx(again[r["image"], r["row"]]["lpips"], abs=1e-5) for r in records)

    # Resuming skips finished images; a lost record (or grid) is redone alone.
    text = (tmp_path / "a" / "per_image.csv").read_text()
    resumed = StandIn(taesd)
    _run(tiny_root, tmp_path / "a", taesd, metrics, resumed, batch_size=2, grids=1)
    assert resumed.calls == [] and (tmp_path / "a" / "per_image.csv").read_text() == text
    kept = [line for line in text.splitlines(keepends=True) if not line.startswith("tiny,c.png,model,")]
    (tmp_path / "a" / "per_image.csv").write_text("".join(kept))
    _run(tiny_root, tmp_path / "a", taesd, metrics, resumed, batch_size=2, grids=1)
    assert resumed.calls == [[2]] and len(read_records(tmp_path / "a" / "per_image.csv")) == 18

    with pytest.raises(ConfigError, match="seed"):
        _run(tiny_root, tmp_path / "a", taesd, metrics, resumed, seed=1)


def test_model_row_from_a_checkpoint(tmp_path, tiny_root, taesd, metrics):
    from latentup.nn.unet import UNet, UNetConfig
    from latentup.pipeline import Upscaler
    from latentup.weights.single_file import save_upscaler

    config = UNetConfig(channels=(32, 32, 64, 64), depths=(1,) * 4, cross_attention_dim=None, mapping_dim=64,
                        mapping_cond_dim=128, head_dim=32)
    torch.manual_seed(0)
    path = save_upscaler(tmp_path / "tiny-model.safetensors", UNet(config).state_dict(), dataclasses.asdict(config))
    models = load_models([path, path], taesd, steps=2, sampler="euler", cfg_scale=None, prompt="")
    assert list(models) == ["tiny-model", "tiny-model-1"]
    assert next(taesd.parameters()).dtype == torch.float32
    summary = evaluate(taesd, {"tiny": tiny_root / "tiny"}, tmp_path / "out", metrics, models, limit=1, grids=0,
                       progress=False)
    hr, lr = load_pair(tiny_root / "tiny" / "a.png")
    upscaler = Upscaler.from_pretrained(path, autoencoder=taesd)
    with torch.no_grad():
        pred = taesd.decode(upscaler.upscale_latent(taesd.encode(lr[None], sample=False), seed=[0], steps=2))
    assert summary["tiny"]["rows"]["tiny-model"]["psnr_y"] == pytest.approx(metrics(pred, hr[None])["psnr_y"].item())

    fixed = load_models([path], taesd, steps=2, sampler="euler", colour_fix=1.0)["tiny-model"]
    with torch.no_grad():
        z = taesd.encode(lr[None], sample=False)
        assert torch.allclose(fixed(z, seed=[0]), colour_fix(pred, taesd.decode(z), 1.0), atol=1e-6)


def test_picture_row_is_the_path_infer_runs(tmp_path, tiny_root, taesd, metrics):
    """``<name> picture``: the LR picture through upscale_pixels, which is upscale_images (infer.py) before its
    8-bit rounding; its colour fix takes the low band from the picture itself."""
    from torchvision.transforms.functional import to_pil_image, to_tensor

    from latentup.nn.unet import UNet, UNetConfig
    from latentup.pipeline import Upscaler
    from latentup.weights.single_file import save_upscaler

    config = UNetConfig(channels=(32, 32, 64, 64), depths=(1,) * 4, cross_attention_dim=None, mapping_dim=64,
                        mapping_cond_dim=128, head_dim=32)
    torch.manual_seed(0)
    path = save_upscaler(tmp_path / "tiny-model.safetensors", UNet(config).state_dict(), dataclasses.asdict(config))
    settings = {"steps": 2, "sampler": "euler", "colour_fix": 1.0}
    models = load_models([path], taesd, pictures=True, **settings)
    assert list(models) == ["tiny-model", "tiny-model picture"]
    summary = evaluate(taesd, {"tiny": tiny_root / "tiny"}, tmp_path / "out", metrics, models, limit=1, grids=0,
                       progress=False)
    hr, lr = load_pair(tiny_root / "tiny" / "a.png")
    upscaler = Upscaler.from_pretrained(path, autoencoder=taesd)
    picture = upscaler.upscale_pixels(lr[None], seed=[0], **settings)
    row = summary["tiny"]["rows"]["tiny-model picture"]
    assert row["psnr_y"] == pytest.approx(metrics(picture, hr[None])["psnr_y"].item())
    assert row["psnr_y"] != pytest.approx(summary["tiny"]["rows"]["tiny-model"]["psnr_y"])  # not the latent row
    infer = to_tensor(upscaler.upscale_images([to_pil_image(lr)], [0], **settings)[0])
    assert (infer - picture[0]).abs().max() <= 0.5 / 255 + 1e-6


def _cli(*args, env=None):
    env = {**os.environ, "LATENTUP_WEIGHTS": str(SHARED / "weights"), **(env or {})}
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_cli_runs_and_fails_cleanly(tmp_path, tiny_root):
    done = _cli(f"data_root={tiny_root}", "sets=[tiny]", f"output_dir={tmp_path / 'out'}", "limit=1", "lpips=false",
                "grids=0", "progress=false")
    assert done.returncode == 0, done.stderr
    assert "| pixel-bicubic-of-LR |" in done.stdout and "LPIPS" not in done.stdout.split("### tiny")[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = _cli(f"data_root={tiny_root}", "sets=[tiny]", f"output_dir={tmp_path / 'fail'}",
                  env={"LATENTUP_WEIGHTS": str(empty), "TORCH_HOME": str(empty)})
    assert failed.returncode == 2 and "LPIPS AlexNet backbone not found" in failed.stderr
    assert "lpips=false" in failed.stderr
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert not (tmp_path / "fail").exists()


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory, tiny_root):
    """``tiny`` plus a set 'broken': a good image and one cut in half (its header still reads)."""
    root = tmp_path_factory.mktemp("broken")
    (root / "tiny").symlink_to(tiny_root / "tiny")
    (root / "broken").mkdir()
    data = (tiny_root / "tiny" / "c.png").read_bytes()
    (root / "broken" / "a.png").write_bytes((tiny_root / "tiny" / "a.png").read_bytes())
    (root / "broken" / "b.png").write_bytes(data[: len(data) // 2])
    return root


BUNDLED = str(REPO / "latentup" / "assets" / "latentup-x2-taesd.safetensors")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("overrides, error, message", [
    (["sets=[nope]"], InputError, "does not exist"),
    (["sets=[]"], ConfigError, "sets is empty"),
    (["batch_size=0"], ConfigError, "batch_size"),
    (["align=40"], ConfigError, "align"),
    (["align=abc"], ConfigError, "align must be an integer"),
    (["limit=0"], ConfigError, r"limit must be >= 1 \(an integer or null\)"),
    (["limit=-1"], ConfigError, r"limit must be >= 1 \(an integer or null\)"),
    (["border=-1"], ConfigError, r"border must be >= 0 \(an integer\), got -1"),
    (["border=16"], ConfigError, "border=16 must be under align / 4"),
    (["grids=1.5"], ConfigError, r"grids must be >= 0 \(an integer\)"),
    (["grid_tile=0"], ConfigError, r"grid_tile must be >= 1 \(an integer\)"),
    (["seed=abc"], ConfigError, "seed"),
    (["sampler=foo"], ConfigError, "unknown sampler 'foo'"),  # checked without checkpoints too
    (["steps=abc", f"checkpoints=[{BUNDLED}]"], ConfigError, "steps"),
    (["cfg_scale=abc", f"checkpoints=[{BUNDLED}]"], ConfigError, "cfg_scale"),
    (["dtype=foo"], ConfigError, "unknown dtype"),
    (["device=foo"], ConfigError, "device='foo' is not a torch device"),
    pytest.param(["device=cuda"], ConfigError, "device=cuda but no CUDA GPU is available: use device=cpu or device=",
                 marks=NO_GPU),
    (["output_dir={tmp}/file"], InputError, "file is a file, not a folder: pass another output_dir"),
    (["output_dir={tmp}/file/sub"], InputError, "file is a file, not a folder"),
    (["sets=[tiny,broken]"], InputError, r"broken/b\.png is not a readable image"),
    (["checkpoints=[missing.safetensors]"], WeightsNotFoundError, "checkpoint"),
    (["lpips=true", "lpips_backbone=nothing.safetensors"], WeightsNotFoundError, "lpips=false"),
])
def test_bad_config_is_one_clear_error(tmp_path, broken_root, overrides, error, message):
    from hydra import compose, initialize_config_dir

    from latentup.evaluation.run import from_config

    (tmp_path / "file").write_text("x")
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("evaluate", [f"data_root={broken_root}", "sets=[tiny]", f"output_dir={tmp_path / 'out'}",
                                   "lpips=false", "progress=false", *(o.format(tmp=tmp_path) for o in overrides)])
    with pytest.raises(error, match=message):
        from_config(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "x"


def test_unreadable_image_fails_before_anything_is_written(tmp_path, broken_root, taesd, metrics):
    with pytest.raises(InputError, match=r"b\.png is not a readable image"):
        evaluate(taesd, {"broken": broken_root / "broken"}, tmp_path / "out", metrics, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"limit must be >= 1 \(an integer or null\)"):
        evaluate(taesd, {"broken": broken_root / "broken"}, tmp_path / "out", metrics, limit=0, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["limit=0"], "limit must be >= 1 (an integer or null), got 0: null = every image"),
    (["limit=null", "sets=[broken]"], "b.png is not a readable image (OSError): fix or remove it"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, broken_root, overrides, message):
    failed = _cli(f"data_root={broken_root}", "sets=[tiny]", f"output_dir={tmp_path / 'out'}", "lpips=false",
                  "progress=false", *overrides)
    assert failed.returncode == 2 and failed.stderr.startswith("error: ") and message in failed.stderr
    assert failed.stderr.count("\n") == 1 and failed.stdout == "" and not (tmp_path / "out").exists()


def anchor_rows(name: str) -> dict[str, dict[str, float]]:
    """The reference rows of one set from spec/ANCHORS.md: {row: {psnr_y, psnr_rgb, ssim_y, lpips}}."""
    text = (SPEC / "ANCHORS.md").read_text().split(f"### {name} ")[1].split("###")[0]
    rows = {}
    for line in text.splitlines():
        if m := re.match(r"\| \d \| ([\w-]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line):
            rows[m[1]] = dict(zip(("psnr_y", "psnr_rgb", "ssim_y", "lpips"), map(float, m.groups()[1:])))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Set5", "Set14", "B100"])
def test_cli_reproduces_anchors(tmp_path, name):
    done = _cli(f"data_root={EVAL}", f"sets=[{name}]", f"output_dir={tmp_path}", "grids=1", "progress=false")
    assert done.returncode == 0, done.stderr
    ours = json.loads((tmp_path / "summary.json").read_text())["sets"][name]["rows"]
    tolerance = {"psnr_y": 0.05, "psnr_rgb": 0.05, "ssim_y": 0.002, "lpips": 0.002}
    expected = anchor_rows(name)
    assert set(expected) == set(BASELINES)
    for row, values in expected.items():
        for metric, value in values.items():
            assert ours[row][metric] == pytest.approx(value, abs=tolerance[metric]), (row, metric)
    with open(tmp_path / "per_image.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 5 * len(list_set_images(EVAL / name))


def test_settings_name_each_checkpoint_once_beside_picture_rows(tmp_path, tiny_root):
    """With picture rows (two rows per checkpoint) settings.json still maps every model row to its own file."""
    from hydra import compose, initialize_config_dir

    from latentup.evaluation.run import from_config
    from latentup.nn.unet import UNet, UNetConfig
    from latentup.weights.single_file import save_upscaler

    config = UNetConfig(channels=(32, 32, 64, 64), depths=(1,) * 4, cross_attention_dim=None, mapping_dim=64,
                        mapping_cond_dim=128, head_dim=32)
    torch.manual_seed(0)
    paths = [save_upscaler(tmp_path / f"{name}.safetensors", UNet(config).state_dict(), dataclasses.asdict(config))
             for name in ("first", "second")]
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("evaluate", [f"data_root={tiny_root}", "sets=[tiny]", f"output_dir={tmp_path / 'out'}",
                                   "lpips=false", "progress=false", "limit=1", "grids=0", "steps=1",
                                   f"checkpoints=[{paths[0]},{paths[1]}]"])
    summary = from_config(cfg)
    assert list(summary["tiny"]["rows"])[:4] == ["first", "first picture", "second", "second picture"]
    saved = json.loads((tmp_path / "out" / "settings.json").read_text())["checkpoints"]
    assert saved == {"first": str(paths[0]), "second": str(paths[1])}
