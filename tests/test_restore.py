"""Worn pictures (issue 27): the cleaner inside an upscaler file and the picture path (``restore``), and the
evaluation's worn rows (``degradation=``), scored against the clean HR."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from conftest import REPO, SHARED
from latentup.colour_fix import downscale_x2
from latentup.data.degradation import load_degradation
from latentup.errors import ConfigError, WeightsMismatchError
from latentup.evaluation.protocol import bicubic2x, load_pair
from latentup.nn.cleaner import Cleaner, CleanerConfig
from latentup.seeds import mix_seed

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = SHARED / "datasets" / "eval"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(tiny upscaler file, the same with a non-trivial cleaner that it recommends, the cleaner module)."""
    from latentup.nn.unet import UNet, UNetConfig
    from latentup.training.cleaner import bundle, save_cleaner
    from latentup.weights.single_file import save_upscaler

    root = tmp_path_factory.mktemp("restore")
    config = UNetConfig(channels=(32, 32, 64, 64), depths=(1,) * 4, cross_attention_dim=None, mapping_dim=64,
                        mapping_cond_dim=128, head_dim=32)
    torch.manual_seed(0)
    plain = save_upscaler(root / "plain.safetensors", UNet(config).state_dict(), dataclasses.asdict(config),
                          meta={"autoencoder": "taesd", "recommended": {"steps": 2}})
    cleaner = Cleaner(CleanerConfig(width=8, depth=3))
    torch.nn.init.normal_(cleaner.body[-1].weight, std=0.2)
    cleaner.load_state_dict({k: v.half().float() for k, v in cleaner.state_dict().items()})  # as stored (fp16)
    exported = save_cleaner(root / "cleaner.safetensors", cleaner, {"training": {}})
    with_cleaner = bundle(plain, exported, root / "with_cleaner.safetensors", {"restore": True, "back_projection": 5})
    return plain, with_cleaner, cleaner.eval()


def pictures() -> torch.Tensor:
    return torch.stack([load_pair(EVAL / "Set5" / name, 64)[1][:, :48, :40] for name in ("baby.png", "bird.png")])


def test_restore_cleans_the_picture_first_and_back_projects_onto_the_cleaned_one(files):
    from latentup.pipeline import Upscaler

    _, path, cleaner = files
    upscaler = Upscaler.from_pretrained(path)
    assert upscaler.settings().restore is True  # recommended by the file
    pixels = pictures()
    with torch.no_grad():
        cleaned = cleaner(pixels)
    assert (cleaned - pixels).abs().mean() > 1e-3
    restored = upscaler.upscale_pixels(pixels, seed=[0, 1], back_projection=0)
    by_hand = upscaler.upscale_pixels(cleaned, seed=[0, 1], back_projection=0, restore=False)
    assert torch.allclose(restored, by_hand, atol=1e-5)
    projected = upscaler.upscale_pixels(pixels, seed=[0, 1], back_projection=20)
    onto_cleaned = (downscale_x2(projected) - cleaned).abs().mean()
    assert onto_cleaned < 0.25 * (downscale_x2(projected) - pixels).abs().mean()


def test_restore_needs_a_cleaner_and_a_damaged_cleaner_is_refused(files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from latentup.pipeline import Upscaler

    plain, path, _ = files
    upscaler = Upscaler.from_pretrained(plain)
    assert upscaler.cleaner is None and upscaler.settings().restore is False
    with pytest.raises(ConfigError, match="restore=true needs weights with a cleaner"):
        upscaler.upscale_pixels(pictures(), restore=True)
    with pytest.raises(ConfigError, match="restore must be true, false or auto"):
        upscaler.settings(restore="yes")
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta = json.loads(metadata["meta"])
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken, metadata={**metadata, "meta": json.dumps({**meta, "cleaner": {"widht": 8}})})
    with pytest.raises(WeightsMismatchError, match="unusable cleaner config"):
        Upscaler.from_pretrained(broken)
    save_file({k: v for k, v in tensors.items() if not k.startswith("cleaner.")}, broken, metadata=metadata)
    with pytest.raises(WeightsMismatchError, match="must come together"):
        Upscaler.from_pretrained(broken)


def test_worn_rows_wear_the_lr_and_score_against_the_clean_hr(tmp_path):
    from hydra import compose, initialize_config_dir

    from latentup.evaluation.metrics import ImageMetrics
    from latentup.evaluation.run import from_config

    root = tmp_path / "data"
    (root / "tiny").mkdir(parents=True)
    Image.open(EVAL / "Set5" / "baby.png").convert("RGB").crop((80, 80, 208, 208)).save(root / "tiny" / "a.png")

    def run(name, *extra):
        with initialize_config_dir(str(REPO / "configs"), version_base=None):
            cfg = compose("evaluate", [f"data_root={root}", "sets=[tiny]", f"output_dir={tmp_path / name}",
                                       "lpips=false", "progress=false", "grids=0", *extra])
        return from_config(cfg)["tiny"]["rows"]

    clean, worn = run("clean"), run("worn", "degradation=jpeg")
    hr, lr = load_pair(root / "tiny" / "a.png")
    worn_lr = load_degradation("jpeg").tensor(lr, mix_seed(0, 0))
    expected = ImageMetrics(lpips=False)(bicubic2x(worn_lr[None]).clamp(0, 1), hr[None])["psnr_y"].item()
    assert worn["pixel-bicubic-of-LR"]["psnr_y"] == pytest.approx(expected)
    assert worn["pixel-bicubic-of-LR"]["psnr_y"] < clean["pixel-bicubic-of-LR"]["psnr_y"] - 0.5
    assert worn["ceiling"] == clean["ceiling"]  # the HR side stays clean
    settings = json.loads((tmp_path / "worn" / "settings.json").read_text())
    assert settings["degradation"]["stages"][0]["ops"]["jpeg"]["quality"] == [20, 60]
    assert "worn (jpeg quality 20-60" in (tmp_path / "worn" / "results.md").read_text()
    with pytest.raises(ConfigError, match="other settings.*degradation"):
        run("worn", "degradation=pixelate")


def test_infer_picture_and_task_give_the_same_restored_pixels(files, tmp_path):
    """One core: ``infer.py input=`` and ``infer.py task=`` (the server's task path) clean the picture alike, and
    back-project onto the cleaned picture (both recommended by the file)."""
    import os
    import subprocess
    import sys
    import uuid

    import numpy as np

    _, path, _ = files
    photo = Image.open(EVAL / "Set5" / "bird.png").convert("RGB").resize((64, 48))
    photo.save(tmp_path / "in.png")
    task = [{"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "model": "runware:502@1",
             "inputs": {"image": str(tmp_path / "in.png")}, "settings": {"seed": 3}, "outputFormat": "PNG"}]
    (tmp_path / "tasks.json").write_text(json.dumps(task))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(REPO / "infer.py"), f"weights={path}", "progress=false"]
    for extra in ([f"input={tmp_path / 'in.png'}", f"output={tmp_path / 'direct.png'}", "seed=3"],
                  [f"task={tmp_path / 'tasks.json'}", f"output={tmp_path / 'task'}", "task_paths=true"]):
        done = subprocess.run(common + extra, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    task_png = json.loads(line)["data"][0]["imageURL"].removeprefix("file://")
    direct, via_task = (np.asarray(Image.open(p), dtype=np.int16) for p in (tmp_path / "direct.png", task_png))
    assert direct.shape == (96, 128, 3) and np.abs(direct - via_task).max() <= 1
    unrestored = subprocess.run(common + [f"input={tmp_path / 'in.png'}", f"output={tmp_path / 'plain.png'}",
                                          "seed=3", "restore=false"], capture_output=True, text=True, cwd=REPO,
                                env=env, timeout=600)
    assert unrestored.returncode == 0, unrestored.stderr
    assert np.abs(np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int16) - direct).max() > 8


def test_auto_restore_cleans_as_worn_as_the_picture_looks(files):
    from latentup.pipeline import Upscaler
    from latentup.wear import block_share, blockiness, wear_strength

    _, path, cleaner = files
    clean = pictures()
    jpeg = torch.stack([load_degradation("jpeg").tensor(p, seed=i) for i, p in enumerate(clean)])
    pixelated = torch.stack([load_degradation("pixelate").tensor(p, seed=0) for p in clean])
    assert torch.all(blockiness(clean) < 1.1) and torch.all(blockiness(jpeg) > 1.2)
    assert torch.all(block_share(clean) < 0.3) and torch.all(block_share(pixelated) == 1)
    assert torch.equal(wear_strength(clean), torch.zeros(2)) and torch.equal(wear_strength(pixelated), torch.ones(2))
    upscaler = Upscaler.from_pretrained(path)
    auto = upscaler.upscale_pixels(torch.cat([clean, pixelated]), seed=[0, 1, 2, 3], restore="auto", back_projection=0)
    off = upscaler.upscale_pixels(clean, seed=[0, 1], restore=False, back_projection=0)
    on = upscaler.upscale_pixels(pixelated, seed=[2, 3], restore=True, back_projection=0)
    assert torch.allclose(auto[:2], off, atol=1e-5) and torch.allclose(auto[2:], on, atol=1e-5)
    with pytest.raises(ConfigError, match="restore must be true, false or auto"):
        upscaler.settings(restore=1)
