"""FID and KID: the FID Inception-v3 (2048-d pool3 features) loaded from a local file, and set distances.

The network is torchvision's Inception3 (1008 classes, no aux logits, its key names) with the weights of the
TensorFlow 2015-12-05 graph that FID was defined on, as ported by pytorch-fid (``pt_inception-2015-12-05-6726825d
.pth``, also used by torch-fidelity) or a ``.safetensors`` conversion of that file. The graph differs from
torchvision's Inception in its pooling branches: the A, C and first E blocks average over the 3x3 window without
counting the zero padding (``count_include_pad=False``), and the last E block max-pools. Nothing is downloaded.

    input   uint8 [0, 255] or float [0, 1] RGB [N, 3, H, W], any size
    x       = 2 * bilinear_299(image01) - 1          (align_corners=False, no antialias: pytorch-fid's input)
    f(x)    = spatial mean of Mixed_7c's output         [N, 2048], float32

Between the features of real images r_i (N_r of them) and of generated images g_j (N_g):

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))        (mu, S: mean, unbiased covariance)
    KID = MMD_u^2(r, g) with k(a, b) = (a.b / 2048 + 1)^3, averaged over random subsets of m images per side

FID is biased upward, the more the fewer images (below ~2,000 the 2048 x 2048 covariance is rank-deficient):
compare rows measured on the same images only. KID's estimator is unbiased; m = min(1000, N_r, N_g), and when m covers
both sets whole, one subset is the exact value.
"""

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchvision.models import inception as tv

from latentup.errors import WeightsMismatchError, WeightsNotFoundError
from latentup.weights.files import read_state_dict
from latentup.weights.strict import mismatch_report

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FEATURES, SIZE = 2048, 299
KID_SUBSET_SIZE, KID_SUBSETS = 1000, 100
LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
          "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c")


def tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 average, stride 1, over the valid pixels only (TensorFlow's SAME average pool)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _BlockA(tv.InceptionA):
    def _forward(self, x: Tensor) -> list[Tensor]:
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(tf_avg_pool(x))]


class _BlockC(tv.InceptionC):
    def _forward(self, x: Tensor) -> list[Tensor]:
        double = x
        for i in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{i}")(double)
        return [self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), double,
                self.branch_pool(tf_avg_pool(x))]


class _BlockE(tv.InceptionE):
    pool = staticmethod(tf_avg_pool)  # the last E block (Mixed_7c) max-pools instead

    def _forward(self, x: Tensor) -> list[Tensor]:
        single, double = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(self.pool(x))]


class FIDInceptionV3(tv.Inception3):
    """``model(images) -> [N, 2048]`` pool3 features; frozen, always in eval mode. Its state-dict keys are
    torchvision's (``fc`` is kept, 1008 classes, so the whole file loads strictly), and ``num_features`` lets it
    serve as torchmetrics' ``feature`` module."""

    num_features = FEATURES

    def __init__(self):
        blocks = [tv.BasicConv2d, _BlockA, tv.InceptionB, _BlockC, tv.InceptionD, _BlockE, tv.InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
        self.Mixed_7c.pool = max_pool
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        param = next(self.parameters())
        x = images.to(param.device, param.dtype) / (255.0 if images.dtype == torch.uint8 else 1.0)
        x = 2 * F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 1
        for name in LAYERS:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """The FID Inception with the weights of ``path`` (.pth read with ``weights_only=True``, or .safetensors), keys
    and shapes checked. BatchNorm step counters (unused in eval) may be absent from the file."""
    path = Path(path).expanduser()
    fix = f"pass the path of {FID_WEIGHTS} (pytorch-fid's FID weights) or its .safetensors conversion, or set fid=null"
    if not path.is_file():
        raise WeightsNotFoundError(f"FID Inception weights {path} do not exist: {fix}")
    model = FIDInceptionV3()
    expected = model.state_dict()
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **read_state_dict(path)}
    report = mismatch_report({k: v.shape for k, v in expected.items()}, state)
    if report:
        raise WeightsMismatchError(f"{path} is not the FID Inception-v3 ({report}): {fix}")
    model.load_state_dict(state)
    return model


class _Given(nn.Module):
    """The identity as torchmetrics' ``feature``: the metrics receive features already extracted."""

    num_features = FEATURES

    def forward(self, features: Tensor) -> Tensor:
        return features


@torch.no_grad()
def set_distances(real: Tensor, fake: Tensor, seed: int = 0) -> dict[str, float]:
    """``{"fid", "kid", "kid_std"}`` between two feature sets [N, 2048] (torchmetrics' FID and KID); empty when
    either set has fewer than two images. KID's subsets are drawn from ``seed`` (global RNG left untouched)."""
    if min(len(real), len(fake)) < 2:
        return {}
    fid = FrechetInceptionDistance(feature=_Given())
    m = min(KID_SUBSET_SIZE, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=_Given(), subset_size=m,
                                      subsets=1 if m == len(real) == len(fake) else KID_SUBSETS)
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
