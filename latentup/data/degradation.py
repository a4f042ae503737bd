"""Wear for the low-res side: a seeded, second-order degradation model (in the manner of Real-ESRGAN).

A degradation is a list of stages; each stage applies its operations, each with probability ``p``, in their listed
order or (``shuffle``) in an order drawn per image, with strengths drawn uniformly from their ranges:

    blur      Gaussian blur, sigma ~ U(sigma) px                          (PIL's GaussianBlur)
    resize    shrink to scale ~ U(scale) and back, each way by one of bilinear / bicubic / box
    noise     y = x + n,  n ~ N(0, s^2) per pixel and channel, s ~ U(sigma) / 255
    grain     y = x + n,  one n ~ N(0, s^2) per pixel added to R, G and B: luminance noise (Y of JPEG's YCbCr)
    jpeg      re-encoded as baseline JPEG (4:2:0) at quality q ~ U{quality}
    pixelate  box-averaged over ``block`` x ``block`` cells, then repeated back (nearest): pixel blocks

Images stay uint8 between operations (each one rounds and clips, as a real chain of tools does), so the output is
an ordinary 8-bit picture of the input's size. With probability ``clean`` nothing is applied, so that a model
trained on such pairs also keeps clean inputs clean. The same seed gives the same wear.

Configs: ``configs/degradation/`` (``realistic`` for training; ``jpeg``, ``grain_jpeg``, ``pixelate`` for the
evaluation's worn rows).
"""

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from latentup.config_files import config_dir
from latentup.errors import ConfigError

RESAMPLE = (Image.BILINEAR, Image.BICUBIC, Image.BOX)
CONFIGS = config_dir("degradation")


def blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else image


def resize(image: Image.Image, scale: float, down: int, up: int) -> Image.Image:
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, RESAMPLE[down]).resize(image.size, RESAMPLE[up])


def add_noise(image: Image.Image, noise: np.ndarray) -> Image.Image:
    """``image`` + ``noise`` (in 0..255 units, [H, W, 3] or [H, W, 1]), rounded and clipped to uint8."""
    values = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Baseline JPEG at ``quality`` (PIL / libjpeg, 4:2:0 chroma), decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality), subsampling="4:2:0")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def pixelate(image: Image.Image, block: int) -> Image.Image:
    """Each ``block`` x ``block`` cell replaced by its mean (box down, nearest up)."""
    small = image.resize((max(1, image.width // block), max(1, image.height // block)), Image.BOX)
    return small.resize(image.size, Image.NEAREST)


# operation -> {parameter it draws: whether the parameter is an integer}; the ranges each parameter may take
OPS = {"blur": {"sigma": False}, "resize": {"scale": False}, "noise": {"sigma": False}, "grain": {"sigma": False},
       "jpeg": {"quality": True}, "pixelate": {"block": True}}
LIMITS = {"sigma": (0.0, 100.0), "scale": (0.05, 4.0), "quality": (1, 95), "block": (2, 16)}


@dataclass(frozen=True)
class Op:
    """One operation of a stage: its name, probability and parameter ranges ``{name: (low, high)}``."""

    name: str
    p: float
    ranges: Mapping[str, tuple[float, float]]

    def draw(self, rng: np.random.Generator) -> dict:
        """The operation's parameters for one image (integers for quality and block)."""
        drawn = {}
        for key, (low, high) in self.ranges.items():
            drawn[key] = int(rng.integers(low, high + 1)) if OPS[self.name][key] else float(rng.uniform(low, high))
        if self.name == "resize":
            drawn["down"], drawn["up"] = (int(v) for v in rng.integers(0, len(RESAMPLE), size=2))
        return drawn

    def apply(self, image: Image.Image, params: dict, rng: np.random.Generator) -> Image.Image:
        if self.name == "blur":
            return blur(image, params["sigma"])
        if self.name == "resize":
            return resize(image, params["scale"], params["down"], params["up"])
        if self.name == "noise":
            return add_noise(image, rng.standard_normal((image.height, image.width, 3), np.float32) * params["sigma"])
        if self.name == "grain":
            return add_noise(image, rng.standard_normal((image.height, image.width, 1), np.float32) * params["sigma"])
        if self.name == "jpeg":
            return jpeg(image, params["quality"])
        return pixelate(image, params["block"])


def _range(where: str, key: str, value, integer: bool) -> tuple[float, float]:
    """``value`` (a number or [low, high]) as a checked (low, high)."""
    low, high = (value, value) if isinstance(value, (int, float)) else tuple(value) if len(value) == 2 else (None, None)
    kinds = (int,) if integer else (int, float)
    if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in (low, high)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}.{key} must be {kind} or [low, high], got {value!r}")
    least, most = LIMITS[key]
    if not least <= low <= high <= most:
        raise ConfigError(f"{where}.{key} = {value!r} must satisfy {least} <= low <= high <= {most}")
    return low, high


def _op(where: str, name: str, spec) -> Op:
    if name not in OPS:
        raise ConfigError(f"{where}: unknown operation {name!r}; known: {', '.join(OPS)}")
    spec = dict(spec or {})
    p = spec.pop("p", 1.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ConfigError(f"{where}.{name}.p must be a probability in [0, 1], got {p!r}")
    unknown = sorted(set(spec) - set(OPS[name]))
    missing = sorted(set(OPS[name]) - set(spec))
    if unknown or missing:
        raise ConfigError(f"{where}.{name} takes p and {', '.join(OPS[name])}"
                          + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                          + (f"; missing: {', '.join(missing)}" if missing else ""))
    return Op(name, float(p), {k: _range(f"{where}.{name}", k, v, OPS[name][k]) for k, v in spec.items()})


class Degradation:
    """Seeded wear: ``degradation(image, rng) -> (worn image, [(op, params), ...] applied)``."""

    def __init__(self, stages: Sequence[tuple[Sequence[Op], bool]] = (), clean: float = 0.0):
        self.stages, self.clean = [(tuple(ops), bool(shuffle)) for ops, shuffle in stages], float(clean)

    @classmethod
    def from_config(cls, config: Mapping | None, where: str = "degradation") -> "Degradation | None":
        """From ``{clean: p, stages: [{shuffle: bool, ops: {name: {p, ranges...}}}, ...]}``; None or no stages
        gives None (no wear)."""
        if config is None:
            return None
        config = dict(config)
        unknown = sorted(set(config) - {"clean", "stages"})
        if unknown:
            raise ConfigError(f"{where} takes clean and stages; unknown: {', '.join(unknown)}")
        clean = config.get("clean", 0.0)
        if isinstance(clean, bool) or not isinstance(clean, (int, float)) or not 0 <= clean <= 1:
            raise ConfigError(f"{where}.clean must be a probability in [0, 1], got {clean!r}")
        stages = []
        for i, stage in enumerate(config.get("stages") or []):
            stage = dict(stage)
            extra = sorted(set(stage) - {"shuffle", "ops"})
            if extra or not stage.get("ops"):
                raise ConfigError(f"{where}.stages[{i}] takes ops (a mapping of operations) and shuffle"
                                  + (f"; unknown: {', '.join(extra)}" if extra else ""))
            ops = [_op(f"{where}.stages[{i}]", name, spec) for name, spec in dict(stage["ops"]).items()]
            stages.append((ops, stage.get("shuffle", False)))
        return cls(stages, clean) if stages else None

    def describe(self) -> str:
        """One line, e.g. ``grain sigma 5-15, then jpeg quality 50-80``."""
        def op(o: Op) -> str:
            ranges = " ".join(f"{k} {lo:g}" + (f"-{hi:g}" if hi != lo else "") for k, (lo, hi) in o.ranges.items())
            return f"{o.name} {ranges}" + (f" (p {o.p:g})" if o.p < 1 else "")

        stages = [("in a random order: " if shuffle and len(ops) > 1 else "") + ", then ".join(map(op, ops))
                  for ops, shuffle in self.stages]
        return (f"clean with p {self.clean:g}, else " if self.clean else "") + "; next stage ".join(stages)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, dict]]]:
        image, applied = image.convert("RGB"), []
        if rng.random() < self.clean:
            return image, applied
        for ops, shuffle in self.stages:
            order = [ops[k] for k in rng.permutation(len(ops))] if shuffle else ops
            for op in order:
                if rng.random() < op.p:
                    params = op.draw(rng)
                    image = op.apply(image, params, rng)
                    applied.append((op.name, params))
        return image, applied

    def tensor(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """The worn copy of an image tensor [3, H, W] in [0, 1] (rounded to uint8 first), seeded by ``seed``."""
        array = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        worn, _ = self(Image.fromarray(array), np.random.default_rng(seed))
        return torch.from_numpy(np.asarray(worn).copy()).permute(2, 0, 1).float().div(255).to(pixels.device)


def load_degradation(spec) -> Degradation | None:
    """A degradation from a config mapping, a YAML file, or a name in ``configs/degradation/`` (None: no wear)."""
    if spec is None or isinstance(spec, Mapping):
        return Degradation.from_config(spec)
    import yaml

    path = Path(spec) if str(spec).endswith((".yaml", ".yml")) else CONFIGS / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise ConfigError(f"degradation {spec!r} is neither a YAML file nor one of: {known}")
    return Degradation.from_config(yaml.safe_load(path.read_text()), f"degradation {path.stem}")
