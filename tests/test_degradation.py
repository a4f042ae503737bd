"""Wear for the LR side (issue 27): each operation does what it says, at the drawn strength, reproducibly; worn
pairs for the shards and for the cleaner; the cleaner and its training loop."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import SHARED
from latentup.data.degradation import CONFIGS, Degradation, jpeg, load_degradation
from latentup.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def photo(size=(96, 64)) -> Image.Image:
    return Image.open(SHARED / "datasets/eval/Set14/baboon.png").convert("RGB").resize(size, Image.BICUBIC)


def grey(value=128, size=(256, 256)) -> Image.Image:
    return Image.new("RGB", size, (value,) * 3)


def only(op: str, **ranges) -> Degradation:
    return Degradation.from_config({"stages": [{"ops": {op: ranges}}]})


def test_jpeg_reencodes_at_the_drawn_quality():
    wear = only("jpeg", quality=[20, 60])
    image = photo()
    worn, applied = wear(image, np.random.default_rng(3))
    [(name, params)] = applied
    assert name == "jpeg" and 20 <= params["quality"] <= 60
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=params["quality"], subsampling="4:2:0")
    assert np.array_equal(np.asarray(worn), np.asarray(Image.open(buffer).convert("RGB")))
    other = jpeg(image, params["quality"] + 30)
    assert not np.array_equal(np.asarray(worn), np.asarray(other))


@pytest.mark.parametrize("op", ["noise", "grain"])
def test_noise_has_the_drawn_sigma_and_grain_is_luminance_only(op):
    worn, [(_, params)] = only(op, sigma=[5, 15])(grey(), np.random.default_rng(0))
    difference = np.asarray(worn, dtype=np.float64) - 128
    assert 5 <= params["sigma"] <= 15
    assert difference.std() == pytest.approx(params["sigma"], rel=0.03)
    channels_equal = np.array_equal(difference[..., 0], difference[..., 1]) and np.array_equal(
        difference[..., 1], difference[..., 2])
    assert channels_equal == (op == "grain")
    if op == "noise":
        assert abs(np.corrcoef(difference[..., 0].ravel(), difference[..., 1].ravel())[0, 1]) < 0.05


def test_pixelate_makes_blocks_of_the_cell_means():
    image = photo((64, 48))
    worn, _ = only("pixelate", block=2)(image, np.random.default_rng(0))
    out = np.asarray(worn, dtype=np.float64)
    cells = np.asarray(image, dtype=np.float64).reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.array_equal(out[0::2, 0::2], out[1::2, 1::2]) and np.array_equal(out[0::2, 0::2], out[0::2, 1::2])
    assert np.abs(out[0::2, 0::2] - cells).max() <= 1


def test_blur_and_resize_soften_and_keep_the_size():
    image = photo()
    detail = lambda x: np.abs(np.diff(np.asarray(x, dtype=np.float64), axis=1)).mean()  # noqa: E731
    for wear in (only("blur", sigma=1.5), only("resize", scale=0.5)):
        worn, _ = wear(image, np.random.default_rng(0))
        assert worn.size == image.size and detail(worn) < 0.8 * detail(image)


def test_same_seed_same_wear_and_order_is_drawn():
    wear = load_degradation("realistic")
    image = photo()
    a, applied_a = wear(image, np.random.default_rng(7))
    b, applied_b = wear(image, np.random.default_rng(7))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and applied_a == applied_b
    orders = {tuple(name for name, _ in wear(image, np.random.default_rng(seed))[1]) for seed in range(40)}
    assert len(orders) > 10  # shuffled stages, random ops: many different chains
    assert () in orders  # the clean share


def test_tensor_form_matches_the_picture_form():
    wear = only("jpeg", quality=40)
    image = photo()
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    worn = wear.tensor(pixels, seed=5)
    expected, _ = wear(image, np.random.default_rng(5))
    assert torch.equal(worn, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 255)


def test_every_shipped_config_loads():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"none", "jpeg", "grain_jpeg", "pixelate", "realistic"} <= set(names)
    assert load_degradation("none") is None
    for name in names:
        load_degradation(name)


@pytest.mark.parametrize("config, message", [
    ({"stages": [{"ops": {"sharpen": {}}}]}, "unknown operation 'sharpen'"),
    ({"stages": [{"ops": {"jpeg": {"quality": [60, 20]}}}]}, "low <= high"),
    ({"stages": [{"ops": {"jpeg": {"quality": 50.5}}}]}, "must be an integer"),
    ({"stages": [{"ops": {"noise": {"p": 2, "sigma": 3}}}]}, "probability"),
    ({"stages": [{"ops": {"noise": {}}}]}, "missing: sigma"),
    ({"stages": [{"ops": {"noise": {"sigma": 3, "size": 2}}}]}, "unknown: size"),
    ({"clean": 0.1, "stage": []}, "unknown: stage"),
])
def test_bad_configs_are_one_line_errors(config, message):
    with pytest.raises(ConfigError, match=message) as error:
        Degradation.from_config(config)
    assert "\n" not in str(error.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="jpeg.*realistic"):
        load_degradation("jpg")


def test_prepared_pairs_wear_only_the_lr_side(tmp_path):
    from latentup.autoencoders import load_autoencoder
    from latentup.data.prepare import PrepareSettings, prepare_pairs
    from latentup.data.shards import LatentShardDataset
    from test_data import make_images

    images = make_images(tmp_path / "images", sizes=((200, 150), (260, 140)), captions=False)
    taesd = load_autoencoder("taesd").eval()
    common = {"source": str(images), "autoencoder": "taesd", "crop": 128, "crops_per_image": 2, "seed": 3}
    wear = {"stages": [{"ops": {"grain": {"sigma": 12}}}]}
    clean = prepare_pairs(PrepareSettings(**common), tmp_path / "clean", taesd, progress=False)
    worn = prepare_pairs(PrepareSettings(**common, degradation=wear), tmp_path / "worn", taesd, progress=False)
    prepare_pairs(PrepareSettings(**common, degradation=wear), tmp_path / "again", taesd, progress=False)
    assert "degradation" not in clean["settings"] and worn["settings"]["degradation"] == wear
    a, b, c = (LatentShardDataset(tmp_path / name) for name in ("clean", "worn", "again"))
    assert len(a) == len(b) == 4
    for i in range(4):
        assert torch.equal(a[i]["hr"], b[i]["hr"])  # HR stays clean
        assert (a[i]["lr"] - b[i]["lr"]).abs().mean() > 0.02  # the LR carries the grain
        assert torch.equal(b[i]["lr"], c[i]["lr"])  # seeded
    with pytest.raises(ConfigError, match="other settings.*degradation"):
        prepare_pairs(PrepareSettings(**common, degradation={"stages": [{"ops": {"jpeg": {"quality": 30}}}]}),
                      tmp_path / "worn", taesd, progress=False)


def test_worn_pairs_are_a_function_of_the_step(tmp_path):
    from latentup.data.worn import WornPairs
    from test_data import make_images

    images = make_images(tmp_path, sizes=((200, 150), (260, 140)), captions=False)
    pairs = WornPairs(str(images), load_degradation("jpeg"), patch=32, batch_size=3, seed=1)
    first, again, second = pairs.batch(4), pairs.batch(4), pairs.batch(5)
    assert first["worn"].shape == first["clean"].shape == (3, 3, 32, 32)
    assert torch.equal(first["worn"], again["worn"]) and not torch.equal(first["clean"], second["clean"])
    assert not torch.equal(first["worn"], first["clean"])


def test_cleaner_starts_as_the_identity_and_takes_any_size():
    from latentup.nn.cleaner import Cleaner, CleanerConfig

    cleaner = Cleaner(CleanerConfig(width=8, depth=3))
    pictures = torch.rand(2, 3, 17, 30)
    assert torch.equal(cleaner(pictures), pictures)
    torch.nn.init.normal_(cleaner.body[-1].weight, std=0.1)
    out = cleaner(pictures)
    assert out.shape == pictures.shape and not torch.equal(out, pictures) and 0 <= out.min() and out.max() <= 1


def test_cleaner_training_lowers_the_loss_exports_and_resumes(tmp_path):
    from latentup.data.worn import WornPairs
    from latentup.training.cleaner import CleanerRecipe, train_cleaner
    from test_data import make_images

    images = make_images(tmp_path / "images", sizes=((200, 150),), captions=False)
    recipe = CleanerRecipe(cleaner={"width": 16, "depth": 3}, degradation="pixelate", patch=32, batch_size=4,
                           warmup=1, lr=1e-3, bf16=False)
    pairs = WornPairs(str(images), load_degradation(recipe.degradation), recipe.patch, recipe.batch_size)
    lines = []
    run = tmp_path / "run"
    train_cleaner(recipe, pairs, run, budgets=[3.0], clock="wall", log=lines.append)
    export = run / "at_3s.safetensors"
    with safe_open(str(export), "pt") as f:
        assert f.metadata()["format"] == "latentup.cleaner/1" and any(k.startswith("cleaner.") for k in f.keys())
    steps = int(torch.load(run / "last.pt", weights_only=True)["step"])
    assert steps >= 100
    gains = [float(line.split(", ")[1].split(" dB")[0]) for line in lines if " mse " in line]
    assert gains[-1] > 1.0  # dB below the worn inputs' own error
    train_cleaner(recipe, pairs, run, budgets=[3.0, 4.0], clock="wall", log=lines.append)
    assert any(line.startswith(f"resumed {run / 'last.pt'} at step {steps}") for line in lines)
    assert (run / "at_4s.safetensors").is_file()
