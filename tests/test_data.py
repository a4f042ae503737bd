"""Latent-pair data: crops, sources (folder / WebDataset tar), shard preparation (resumable), datasets, stream."""

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentup.data.crops import check_crop, downscale_x2, grid_boxes, pair, random_boxes
from latentup.data.datamodule import PairDataModule, collate
from latentup.data.datasets import ImageCropDataset, ImageEvalDataset
from latentup.data.prepare import PrepareSettings, prepare_pairs
from latentup.data.shards import LatentShardDataset, ShardWriter, read_manifest
from latentup.data.sources import ImageFolder, TarShards
from latentup.data.stream import EpochStream, GlobalBatchSampler
from latentup.errors import ConfigError, InputError


pytestmark = pytest.mark.usefixtures("one_thread")


def make_images(root, sizes=((200, 150), (260, 140), (140, 140), (300, 220), (90, 70)), captions=True):
    """Smooth synthetic photos (the last one too small for a 128-px crop), half of them in a subfolder."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 6, 3)
        image = np.stack([np.sin(x / (6 + i) + p) * np.cos(y / (9 + i) - p) for p in phase], -1) * 0.5 + 0.5
        folder = root / ("sub" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"im{i}.png")
        if captions:
            (folder / f"im{i}.txt").write_text(f"pattern number {i}")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def taesd():
    from latentup.autoencoders import load_autoencoder

    return load_autoencoder("taesd").eval()


def test_crop_geometry():
    assert check_crop(256) == 256
    for bad in (100, 64, 0):
        with pytest.raises(ConfigError, match="size rule"):
            check_crop(bad)
    boxes = random_boxes(300, 200, 128, 5, np.random.default_rng(0))
    assert len(boxes) == 5 and all(0 <= l and r <= 300 and 0 <= t and b <= 200 and r - l == b - t == 128
                                   for l, t, r, b in boxes)
    assert random_boxes(100, 200, 128, 3, np.random.default_rng(0)) == []
    assert grid_boxes(300, 200, 128) == [(22, 36, 150, 164), (150, 36, 278, 164)]
    assert len(grid_boxes(256, 256, 128, stride=64)) == 9


def test_pair_is_pil_bicubic_half(images):
    image = Image.open(images / "im0.png").convert("RGB")
    hr, lr = pair(image, (10, 5, 138, 133))
    assert hr.shape == (3, 128, 128) and lr.shape == (3, 64, 64)
    expected = np.asarray(image.crop((10, 5, 138, 133)).resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.equal(lr, torch.from_numpy(expected).permute(2, 0, 1))
    assert downscale_x2(image).size == (100, 75)


def test_folder_and_tar_sources_agree(images, tmp_path):
    folder = ImageFolder(images)
    keys = [folder.key(i) for i in range(len(folder))]
    assert keys == ["im0.png", "im2.png", "im4.png", "sub/im1.png", "sub/im3.png"]
    assert folder[3].caption == "pattern number 1"
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(len(folder)):
            stem = folder.key(i).rsplit(".", 1)[0]
            tar.add(folder.files[i], arcname=f"{stem}.png")
            tar.add(folder.files[i].with_suffix(".txt"), arcname=f"{stem}.txt")
    shards = TarShards(str(tmp_path / "*.tar"))
    assert len(shards) == len(folder)
    for i in range(len(folder)):
        a, b = folder[i], shards[i]
        assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    with pytest.raises(InputError, match="no tar shards"):
        TarShards(str(tmp_path / "missing-*.tar"))


def _settings(images, **kw) -> PrepareSettings:
    return PrepareSettings(**{"source": str(images), "autoencoder": "taesd", "crop": 128, "crops_per_image": 2,
                              "seed": 3, **kw})


def _shard_tensors(root) -> dict:
    dataset = LatentShardDataset(root)
    return {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in ("hr", "lr")}


def test_prepare_writes_encoded_pairs(images, taesd, tmp_path):
    manifest = prepare_pairs(_settings(images), tmp_path / "pairs", taesd, shard_size=3, batch_size=4, progress=False)
    assert manifest["complete"] and manifest["count"] == 8 and manifest["skipped"] == ["im4.png"]
    assert [(s["count"], s["sources_end"]) for s in manifest["shards"]] == [(4, 2), (4, 5)]  # at source boundaries
    data = LatentShardDataset(tmp_path / "pairs")
    item = data[5]  # second shard, second sample: crop 1 of sub/im1.png
    assert item["hr"].shape == (4, 16, 16) and item["lr"].shape == (4, 8, 8) and item["caption"] == "pattern number 1"
    assert item["hr"].dtype == torch.float32 and len(data) == 8 and "hr_pixels" not in item


def test_prepare_resumes_to_identical_shards(images, taesd, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    prepare_pairs(_settings(images), reference, taesd, shard_size=2, progress=False)
    resumed = tmp_path / "resumed"
    original_flush, calls = ShardWriter.flush, []

    def crash_after_two(self, *args, **kwargs):
        original_flush(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "flush", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_pairs(_settings(images), resumed, taesd, shard_size=2, progress=False)
    monkeypatch.setattr(ShardWriter, "flush", original_flush)
    partial = read_manifest(resumed)
    assert not partial["complete"] and len(partial["shards"]) == 2
    with pytest.raises(InputError, match="partly prepared"):
        LatentShardDataset(resumed)
    prepare_pairs(_settings(images), resumed, taesd, shard_size=2, progress=False)
    a, b = _shard_tensors(reference), _shard_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="crop"):
        prepare_pairs(_settings(images, crop=192), resumed, taesd, progress=False)


def test_prepare_grid_and_text(images, taesd, tmp_path):
    from latentup.text import CLIPTextConditioner, TextTowerConfig

    text = CLIPTextConditioner(TextTowerConfig(width=64, layers=2, heads=2, mlp_width=128)).eval()
    settings = _settings(images, mode="grid", text_encoder="tiny-clip")
    manifest = prepare_pairs(settings, tmp_path / "grid", taesd, text, progress=False)
    assert manifest["count"] == 1 + 1 + 2 + 2  # tiles of im0, im2, sub/im1, sub/im3 (im4 is too small)
    data = LatentShardDataset(tmp_path / "grid")
    item = data[0]
    assert item["context"].shape == (77, 64) and item["pooled"].shape == (64,) and item["mask"].dtype == torch.bool
    expected = text.encode([item["caption"]])
    assert torch.allclose(item["context"], expected.context[0], rtol=1e-3, atol=1e-3)
    assert data.empty_prompt()["mask"].sum() == 2  # BOS + EOT


@pytest.mark.parametrize(("bad", "message"), [
    ({"crop": "abc"}, r"settings.crop must be >= 1 \(an integer\), got 'abc'"),
    ({"align": 0}, r"settings.align must be >= 1 \(an integer\), got 0"),
    ({"crop": 100}, "size rule"),
    ({"crops_per_image": 0}, r"settings.crops_per_image must be >= 1 \(an integer\), got 0"),
    ({"max_side": -5}, r"settings.max_side must be >= 1 \(an integer or null\), got -5"),
    ({"max_side": 100}, "max_side 100 is below the 128-px crop"),
    ({"stride": 2.5}, r"settings.stride must be >= 1 \(an integer or null\)"),
    ({"mode": "tiles"}, "unknown crop mode"),
])
def test_prepare_settings_are_checked_first(images, bad, message):
    with pytest.raises(ConfigError, match=message):
        _settings(images, **bad)


def test_prepare_refuses_bad_input_before_writing(images, taesd, tmp_path):
    out = tmp_path / "pairs"
    for bad, message in (({"shard_size": 0}, "shard_size must be"), ({"num_workers": -1}, "num_workers must be"),
                         ({"device": "abc"}, "data.prepare.device='abc' is not a torch device")):
        with pytest.raises(ConfigError, match=message):
            prepare_pairs(_settings(images), out, taesd, progress=False, **bad)
    with pytest.raises(InputError, match=r"does not exist: check data\.prepare\.settings\.source"):
        prepare_pairs(_settings(tmp_path / "missing"), out, taesd, progress=False)
    assert not out.exists()
    with pytest.raises(InputError, match="no image of .* is at least 320 px on both sides: lower data.prepare"):
        prepare_pairs(_settings(images, crop=320), out, taesd, progress=False)  # the largest image is 300 x 220
    assert not out.exists()  # no manifest that marks an empty preparation complete


def test_empty_shard_folder_says_to_delete_it(tmp_path):
    ShardWriter(tmp_path / "old", {"crop": 512}).flush(5, complete=True)  # as older versions left it
    with pytest.raises(InputError, match="holds no samples .*: delete it"):
        LatentShardDataset(tmp_path / "old")


def test_shard_values_match_direct_encoding(images, taesd, tmp_path):
    from latentup.seeds import mix_seed

    prepare_pairs(_settings(images, crops_per_image=1), tmp_path / "one", taesd, progress=False)
    data = LatentShardDataset(tmp_path / "one")
    image = Image.open(images / "im2.png").convert("RGB")  # source index 1 in sorted order
    box = random_boxes(*image.size, 128, 1, np.random.default_rng(mix_seed(3, 1)))[0]
    hr, lr = pair(image, box)
    with torch.no_grad():
        expected = taesd.encode(hr[None])[0], taesd.encode(lr[None])[0]
    # fp16 storage rounds |z| < 4 by at most 2^-11 * 4 = 9.8e-4 (measured 9.7e-4); LANCZOS / BOX LR: 5.6e-3 / 1.1e-2
    assert torch.allclose(data[1]["hr"], expected[0], rtol=0, atol=2e-3)
    assert torch.allclose(data[1]["lr"], expected[1], rtol=0, atol=2e-3)


def test_dihedral_crops_are_turned_before_the_low_res_is_made_and_stored_with_pixels(images, taesd, tmp_path):
    from latentup.data.crops import DIHEDRAL
    from latentup.seeds import mix_seed

    prepare_pairs(_settings(images, crops_per_image=6, dihedral=True, pixels=True), tmp_path / "d8", taesd,
                  progress=False)
    data = LatentShardDataset(tmp_path / "d8")
    image = Image.open(images / "im2.png").convert("RGB")  # source index 1 in sorted order
    rng = np.random.default_rng(mix_seed(3, 1))
    boxes = random_boxes(*image.size, 128, 6, rng)  # the same boxes as without dihedral=True
    turns = rng.integers(0, 8, size=6)
    assert len(set(turns.tolist())) > 1
    for j in range(6):
        hr, lr = pair(image, boxes[j], DIHEDRAL[turns[j]])
        plain = pair(image, boxes[j])[0]
        symmetries = [plain.rot90(k, (1, 2)) for k in range(4)] + [plain.flip(2).rot90(k, (1, 2)) for k in range(4)]
        matches = [i for i, view in enumerate(symmetries) if torch.equal(hr, view)]
        assert matches and (0 in matches) == (turns[j] == 0)  # a turned / mirrored view of the crop
        assert torch.equal(data[6 + j]["hr_pixels"], (hr * 255).round().to(torch.uint8))  # what was encoded
        with torch.no_grad():
            expected = taesd.encode(hr[None])[0], taesd.encode(lr[None])[0]
        assert torch.allclose(data[6 + j]["hr"], expected[0], rtol=0, atol=2e-3)  # fp16 storage, as above
        assert torch.allclose(data[6 + j]["lr"], expected[1], rtol=0, atol=2e-3)


def test_stream_is_split_invariant_and_resumable():
    class Numbers:
        def __len__(self):
            return 10

        def sample(self, index, seed):
            return {"index": index, "seed": seed}

    stream = EpochStream(Numbers(), seed=1)
    single = iter(GlobalBatchSampler(4))
    ranks = [iter(GlobalBatchSampler(2, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):
        assert next(single) == next(ranks[0]) + next(ranks[1])
    assert sorted(stream.index(p) for p in range(10)) == list(range(10))
    assert [stream.index(p) for p in range(10)] != [stream.index(p) for p in range(10, 20)]
    resumed = iter(GlobalBatchSampler(4, start=3))
    fresh = iter(GlobalBatchSampler(4))
    for _ in range(3):
        next(fresh)
    assert next(resumed) == next(fresh)
    batch = collate([stream[p] for p in next(resumed)])
    assert batch["position"].tolist() == [16, 17, 18, 19]


def test_image_datasets(images):
    crops = ImageCropDataset(images, crop=128)
    assert len(crops) == 4  # im? (90x70) is too small
    a, b = crops.sample(2, seed=7), crops.sample(2, seed=7)
    assert torch.equal(a["hr_pixels"], b["hr_pixels"]) and a["lr_pixels"].shape == (3, 64, 64)
    assert not torch.equal(a["hr_pixels"], crops.sample(2, seed=8)["hr_pixels"])
    with pytest.raises(InputError, match="lower data.crop"):
        ImageCropDataset(images, crop=512)
    evaluation = ImageEvalDataset(images, limit=3)
    item = evaluation[0]
    assert len(evaluation) == 3 and item["hr_pixels"].shape == (3, 128, 192) and item["lr_pixels"].shape == (3, 64, 96)
    module = PairDataModule(crops, evaluation, batch_size=2)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["hr_pixels"].shape == (2, 3, 128, 128) and batch["position"].tolist() == [0, 1]
