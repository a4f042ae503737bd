"""FID / KID: the FID Inception loader and network (random weights), the distances by hand, and evaluation."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import REPO, SHARED
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchvision.transforms.functional import gaussian_blur

from latentup.autoencoders import load_autoencoder
from latentup.errors import WeightsMismatchError, WeightsNotFoundError
from latentup.evaluation import inception, run
from latentup.evaluation.inception import FID_WEIGHTS, FIDInceptionV3, load_fid_inception, set_distances
from latentup.evaluation.metrics import ImageMetrics
from latentup.evaluation.protocol import BASELINES, list_set_images, load_pair
from latentup.evaluation.report import read_features

EVAL = SHARED / "datasets" / "eval"


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """He-normal convolutions and random BatchNorm statistics, so that activations keep their scale."""
    model, g = FIDInceptionV3(), torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if name.endswith("conv.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * (2 / tensor[0].numel()) ** 0.5)
        elif name.endswith(("bn.weight", "running_var")):
            tensor.uniform_(0.5, 1.5, generator=g)
        elif name.endswith(("bn.bias", "running_mean")) or name.startswith("fc."):
            tensor.normal_(0, 0.1, generator=g)
    return model


@pytest.fixture(scope="module")
def extractor():
    return random_inception()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, extractor):
    """The random weights as .safetensors (every key) and as .pth without BatchNorm step counters."""
    folder = tmp_path_factory.mktemp("inception")
    state = extractor.state_dict()
    save_file(state, str(folder / "fid.safetensors"))
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, folder / FID_WEIGHTS)
    return {"safetensors": folder / "fid.safetensors", "pth": folder / FID_WEIGHTS}


@pytest.fixture(scope="module")
def photos():
    """Five 128 x 128 crops of Set14 photographs, float [0, 1]."""
    return torch.stack([load_pair(f)[0][:, :128, :128] for f in list_set_images(EVAL / "Set14")[:5]])


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_loaded_weights_equal_the_file(weights, kind):
    file = torch.load(weights[kind], weights_only=True) if kind == "pth" else load_file(str(weights[kind]))
    loaded = load_fid_inception(weights[kind]).state_dict()
    counters = {k for k in loaded if k.endswith("num_batches_tracked")}
    assert set(file) == (set(loaded) - counters if kind == "pth" else set(loaded)) and len(counters) == 94
    assert all(torch.equal(loaded[k], v) for k, v in file.items())
    assert loaded["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in loaded)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and FID_WEIGHTS in message and "fid=null" in message
    return message


def test_missing_or_wrong_files_are_one_line_errors(tmp_path, extractor):
    with pytest.raises(WeightsNotFoundError) as error:
        load_fid_inception(tmp_path / "nothing.pth")
    assert "do not exist" in _one_line(error)
    state = extractor.state_dict()
    lost = "Mixed_7c.branch_pool.conv.weight"
    cases = {
        f"missing 1: {lost}": {k: v for k, v in state.items() if k != lost},
        "fc.weight (1000, 2048) != (1008, 2048)": {**state, "fc.weight": torch.zeros(1000, 2048)},
        # torchvision's ImageNet Inception: aux logits and 1000 classes
        "unexpected 14: AuxLogits": torchvision.models.Inception3(init_weights=False).state_dict(),
    }
    for expected, bad in cases.items():
        save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(WeightsMismatchError) as error:
            load_fid_inception(tmp_path / "bad.safetensors")
        assert expected in _one_line(error)


def test_network_is_torchvision_with_the_fid_pooling(extractor):
    """Reference: torchvision's Inception3 with pytorch-fid's patch, i.e. its 9 average pools (Mixed_5b-d, 6b-e,
    7b, 7c) exclude the padding, and the last one is a max pool."""
    reference = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    reference.load_state_dict(extractor.state_dict())
    reference.fc = nn.Identity()
    images = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = extractor(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.equal(features, extractor(images.float() / 255))

    calls, avg_pool = [], F.avg_pool2d

    def fid_pool(x, *args, **kwargs):
        calls.append(x.shape[1])
        return F.max_pool2d(x, 3, 1, 1) if len(calls) == 9 else avg_pool(x, 3, 1, 1, count_include_pad=False)

    x = 2 * F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    with mock.patch.object(F, "avg_pool2d", fid_pool), torch.no_grad():
        expected = reference(x)
    assert calls == [192, 256, 288, 768, 768, 768, 768, 1280, 2048]
    assert torch.allclose(features, expected, rtol=1e-5, atol=1e-5)
    extractor.train()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())


def _fid_by_hand(real, fake):
    """||mu_r - mu_g||^2 + Tr S_r + Tr S_g - 2 ||A B^T||_* with S_r = A^T A, S_g = B^T B (A, B: centred / sqrt(N - 1)):
    the eigenvalues of S_r S_g are the squared singular values of A B^T."""
    a, b = (real.double() - real.double().mean(0)), (fake.double() - fake.double().mean(0))
    a, b = a / (len(a) - 1) ** 0.5, b / (len(b) - 1) ** 0.5
    mean = (real.double().mean(0) - fake.double().mean(0)).square().sum()
    return float(mean + a.square().sum() + b.square().sum() - 2 * torch.linalg.svdvals(a @ b.T).sum())


def _kid_by_hand(real, fake):
    """Unbiased MMD^2 with k(x, y) = (x.y / 2048 + 1)^3 over the whole sets."""
    x, y, m = real.double(), fake.double(), len(real)
    kxx, kyy, kxy = ((a @ b.T / 2048 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_grow_with_blur(extractor, photos):
    real = extractor(photos)
    blurred = [extractor(gaussian_blur(photos, 25, sigma)) for sigma in (1.0, 3.0)]
    same, *far = [set_distances(real, fake) for fake in (real, *blurred)]
    assert abs(same["fid"]) < 1e-4 * far[0]["fid"]
    assert 0 < far[0]["fid"] < far[1]["fid"] and same["kid"] < far[0]["kid"] < far[1]["kid"]
    for fake, values in zip((real, *blurred), (same, *far)):
        assert values["fid"] == pytest.approx(_fid_by_hand(real, fake), rel=1e-6, abs=1e-2)
        assert values["kid"] == pytest.approx(_kid_by_hand(real, fake), rel=1e-9)
        assert values["kid_std"] == 0.0  # five images: one subset, the whole set
    # The extractor is a torchmetrics feature module: images (float or uint8) in, the same distances out.
    kid = KernelInceptionDistance(feature=extractor, subset_size=3, subsets=1)
    kid.update(photos[:3], real=True)
    kid.update(gaussian_blur(photos[:3], 25, 1.0), real=False)
    assert kid.compute()[0].item() == pytest.approx(_kid_by_hand(real[:3], blurred[0][:3]), rel=1e-5)
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update((photos[:2] * 255).round().byte(), real=True)
    assert torch.allclose(fid.real_features_sum, real[:2].double().sum(0), rtol=1e-3, atol=1e-3)
    assert set_distances(real[:1], real) == {}


def test_kid_subsets_are_drawn_from_the_seed(monkeypatch):
    """Sets larger than the subset size: random subsets, drawn from ``seed`` (here 4 of 8 and 9 images)."""
    monkeypatch.setattr(inception, "KID_SUBSET_SIZE", 4)
    monkeypatch.setattr(FrechetInceptionDistance, "compute", lambda self: torch.tensor(0.0))
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(8, 2048, generator=g), torch.rand(9, 2048, generator=g) + 0.01
    state = torch.random.get_rng_state()
    one, again, other = (set_distances(real, fake, seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert one == again and one["kid"] != other["kid"] and one["kid_std"] > 0


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A set 'tiny': two 64x64 crops of Set5 photos and one 128x64."""
    root = tmp_path_factory.mktemp("data")
    (root / "tiny").mkdir()
    for name, source, size in (("a.png", "baby.png", (64, 64)), ("b.png", "bird.png", (64, 64)),
                               ("c.png", "butterfly.png", (128, 64))):
        Image.open(EVAL / "Set5" / source).convert("RGB").crop((80, 80, 80 + size[0], 80 + size[1])).save(
            root / "tiny" / name)
    return root


def test_cli_reports_fid_and_kid(tmp_path, tiny_root, weights):
    env = {**os.environ, "LATENTUP_WEIGHTS": str(SHARED / "weights")}
    done = subprocess.run([sys.executable, "evaluate.py", f"data_root={tiny_root}", "sets=[tiny]", "lpips=false",
                           f"output_dir={tmp_path}", "grids=0", "progress=false", f"fid={weights['safetensors']}"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if line.startswith("| row |"))
    assert header.endswith("| FID | KID ×10³ |") and "fewer than ~2,000 images" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["fid"] == str(weights["safetensors"])
    assert "fid" not in (tmp_path / "per_image.csv").read_text().splitlines()[0]
    folder = tmp_path / "features" / "tiny"
    stored = [read_features(folder / f"{image}.safetensors") for image in ("a.png", "b.png", "c.png")]
    assert all(set(s) == {*BASELINES, "HR"} and all(v.shape == (2048,) for v in s.values()) for s in stored)
    rows = summary["sets"]["tiny"]["rows"]
    real = torch.stack([s["HR"] for s in stored])
    for row in BASELINES:  # the summary holds the distances of the stored features; the table rounds them
        fake = torch.stack([s[row] for s in stored])
        fid, kid = _fid_by_hand(real, fake), _kid_by_hand(real, fake)
        # torchmetrics sums the square roots of all 2048 eigenvalues of S_r S_g, 2046 of them rounding noise around
        # 0 for three images: its FID is lower by 0.004 to 0.009 here
        assert fid > 1 and rows[row]["fid"] == pytest.approx(fid, abs=0.03), row
        assert rows[row]["kid"] == pytest.approx(kid, rel=1e-9) and rows[row]["kid_std"] == 0.0  # one subset: all
        cells = next(line for line in done.stdout.splitlines() if line.startswith(f"| {row} |")).split("|")[-3:-1]
        assert [float(cell) for cell in cells] == pytest.approx([rows[row]["fid"], 1e3 * kid], abs=0.0051), row


def test_missing_weights_fail_before_the_run(tmp_path, tiny_root):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("evaluate", [f"data_root={tiny_root}", "sets=[tiny]", f"output_dir={tmp_path / 'out'}",
                                   "lpips=false", f"fid={tmp_path / 'nothing.pth'}"])
    with pytest.raises(WeightsNotFoundError, match="fid=null"):
        run.from_config(cfg)
    assert not (tmp_path / "out").exists()


def test_resume_reuses_the_feature_cache(tmp_path, tiny_root, extractor, monkeypatch):
    """Features lost with a crash are recomputed bit for bit; cached ones are not recomputed; batching does not
    change them."""
    seen = []

    def distances(real, fake, seed=0):
        seen.append((real, fake))
        return {"fid": float((fake - real).abs().sum()), "kid": 0.0, "kid_std": 0.0}

    monkeypatch.setattr(run, "set_distances", distances)
    taesd, metrics = load_autoencoder("taesd").float().eval(), ImageMetrics(lpips=False)

    def evaluate(folder, batch_size=2):
        return run.evaluate(taesd, {"tiny": tiny_root / "tiny"}, tmp_path / folder, metrics, inception=extractor,
                            batch_size=batch_size, grids=0, progress=False)

    first = evaluate("a")
    assert len(seen) == 5 and all(real.shape == fake.shape == (3, 2048) for real, fake in seen)
    files = {p.name: read_features(p) for p in (tmp_path / "a" / "features" / "tiny").iterdir()}
    assert sorted(files) == ["a.png.safetensors", "b.png.safetensors", "c.png.safetensors"]
    assert torch.equal(seen[0][0], torch.stack([files[f"{i}.png.safetensors"]["HR"] for i in "abc"]))

    (tmp_path / "a" / "features" / "tiny" / "c.png.safetensors").unlink()
    csv = tmp_path / "a" / "per_image.csv"
    csv.write_text("".join(line for line in csv.read_text().splitlines(keepends=True)
                           if not line.startswith("tiny,b.png,ceiling,")))
    calls = []
    hook = extractor.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    try:
        resumed = evaluate("a")
    finally:
        hook.remove()
    assert calls == [1] * 6  # c alone (5 rows + HR); b's features were cached
    again = {p.name: read_features(p) for p in (tmp_path / "a" / "features" / "tiny").iterdir()}
    assert all(torch.equal(again[f][k], v) for f, stored in files.items() for k, v in stored.items())
    assert [v["fid"] for v in resumed["tiny"]["rows"].values()] == [v["fid"] for v in first["tiny"]["rows"].values()]

    alone = evaluate("b", batch_size=1)
    assert all(v["fid"] == pytest.approx(first["tiny"]["rows"][row]["fid"], rel=1e-4)
               for row, v in alone["tiny"]["rows"].items())
