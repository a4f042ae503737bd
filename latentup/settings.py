"""What a caller may set, and one-line ConfigErrors for values of the wrong type or out of range, checked before
any weights load: the sampling settings (:class:`Settings`), the speed and memory knobs (:class:`Speed`), dtypes,
and the checkers every entry point shares (:func:`check_int`, :func:`check_number`, :func:`check_flag`)."""

import math
from dataclasses import dataclass, field, fields

import torch

from latentup.diffusion.samplers import get_sampler
from latentup.diffusion.schedules import make_sigmas
from latentup.errors import ConfigError

VAE_TILE = 128  # default autoencoder tile (latent px): outputs up to 1024 px decode whole
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_AUTO = "reduce-overhead"  # what compile=auto compiles with where it pays (CUDA, long jobs)
COMPILE_AUTO_MIN_IMAGES = 64  # compile=auto: the shortest job (images) whose eager time the compile wait is worth
MAX_STEPS = 1000  # the length of SD's training noise table; more steps only cost time
MAX_SEED = 2**63 - 1
NUMBER_HINTS = {"cfg_scale": "0 = no guidance, > 1 = classifier-free guidance", "noise_level": "0 = no augmentation",
                "colour_fix": "a blur sigma in output px, 0 = off"}


def check_int(name: str, value, low: int | None = None, high: int | None = None, hint: str = "",
              optional: bool = False) -> None:
    """A ConfigError unless ``value`` is an int (not a bool) in low..high (None: unbounded), or None when
    ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (
            high is not None and value > high):
        bounds = " and ".join(f"{op} {v}" for op, v in ((">=", low), ("<=", high)) if v is not None)
        kind = "an integer" + (" or null" if optional else "")
        raise ConfigError(f"{name} must be {f'{bounds} ({kind})' if bounds else kind}, got {value!r}"
                          + (f": {hint}" if hint else ""))


def check_number(name: str, value, hint: str = "") -> None:
    """A ConfigError unless ``value`` is a finite int or float >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{name} must be >= 0 (a finite number{f'; {hint}' if hint else ''}), got {value!r}")


def check_flag(name: str, value) -> None:
    """A ConfigError unless ``value`` is a bool or None."""
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true, false or null, got {value!r}: pass {name}=true or {name}=false")


def as_list(value) -> list:
    """A list of the entries of a list or tuple, or of the one value."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Settings:
    """Sampling knobs (the hosted API's names in brackets)."""

    prompt: str | list[str] = ""  # [positivePrompt]
    negative_prompt: str | list[str] = ""  # [negativePrompt]
    seed: int | list[int] = 0  # [seed]; 0..MAX_SEED, sample i of a batch uses seed + i (latentup.seeds)
    steps: int = 20  # [steps]; 1..MAX_STEPS
    cfg_scale: float = 0.0  # [CFGScale]; <= 1 disables guidance, 0 also empties the prompt (as diffusers)
    sampler: str = "euler"
    schedule: str = "log_linear"
    sampler_options: dict = field(default_factory=dict)  # keyword options of the sampler, e.g. {"eta": 0.5}
    clip_skip: int = 1  # [clipSkip]; 1 (or 0) = last layer, at most the text tower's depth
    noise_level: float = 0.0  # low-res noise augmentation sigma_lr (needs k-diffusion/latentup weights)
    colour_fix: float = 0.0  # image outputs: low band (Gaussian sigma, output px) from the input; 0 = off
    back_projection: int = 0  # picture inputs: iterations making the output downscale to the input; 0 = off
    restore: bool | str = False  # picture inputs: the weights' cleaner removes wear first; "auto": as worn as they look

    def validate(self):
        """One-line ConfigErrors for values of the wrong type or out of range; returns self."""
        if not hasattr(self.sampler_options, "items"):
            raise ConfigError(f"sampler_options must be a mapping such as {{eta: 0.5}}, got {self.sampler_options!r}")
        get_sampler(self.sampler, **self.sampler_options)
        for name, value in self.sampler_options.items():
            check_number(f"sampler_options.{name}", value)
        check_int("steps", self.steps, 1, MAX_STEPS, "e.g. steps=20")
        make_sigmas(self.schedule, self.steps)
        for seed in as_list(self.seed):
            check_int("seed", seed, 0, MAX_SEED, "e.g. seed=0")
        check_int("clip_skip", self.clip_skip, 0, None, "0 or 1 = last CLIP layer, 2 = penultimate")
        check_int("back_projection", self.back_projection, 0, 100, "iterations, 0 = off, e.g. back_projection=10")
        if not (isinstance(self.restore, bool) or self.restore == "auto"):
            raise ConfigError(f"restore must be true, false or auto, got {self.restore!r}")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not all(isinstance(text, str) for text in as_list(value)):
                raise ConfigError(f"{name} must be text or a list of texts, got {value!r}: quote it ({name}='...')")
        for name, hint in NUMBER_HINTS.items():
            check_number(name, getattr(self, name), hint)
        return self


SETTING_NAMES = tuple(f.name for f in fields(Settings))


def parse_setting(text: str) -> dict:
    """``sampler:steps[:colour_fix]`` (the benchmarks' notation, e.g. ``euler:4`` or ``euler:4:1``) -> checked
    keyword settings."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError(f"{len(parts)} fields")
        given = {"sampler": parts[0], "steps": int(parts[1])} | ({"colour_fix": float(parts[2])} if parts[2:] else {})
        Settings(**given).validate()
    except (IndexError, ValueError, ConfigError) as error:
        raise ConfigError(f"setting {text!r} ({error}): expected sampler:steps[:colour_fix], e.g. euler:4:1") from None
    return given


@dataclass(frozen=True)
class Speed:
    """Speed and memory knobs; sizes are latent pixels of the output (8 image pixels each). None of them changes
    the result beyond float rounding below the tile sizes.

    unet_tile: above this side the denoiser runs on overlapping tiles of this side (None: never; inexact, since the
    deepest level's self-attention then sees one tile). vae_tile: the same for the autoencoder's encode and decode
    (None: never). channels_last: NHWC weights and activations (None: off, NCHW on every device, the faster layout
    measured on an H200 and on CPUs). compile: a ``torch.compile`` mode for the U-Net ("default", "reduce-overhead"
    adds CUDA graphs, "max-autotune", "max-autotune-no-cudagraphs"), None for eager, or "auto": where it pays
    (:func:`resolve_compile`; an Upscaler is taken to serve a long job, infer.py decides by its image count).
    winograd: the U-Net's 3×3 convolutions as Winograd F(4×4, 3×3) (``latentup.nn.winograd``; CPU float32 only,
    within ~2e-5 relative; None: on where it applies).
    """

    unet_tile: int | None = None
    vae_tile: int | None = VAE_TILE
    channels_last: bool | None = None
    compile: str | None = None
    winograd: bool | None = None

    def __post_init__(self):
        for name in ("unet_tile", "vae_tile"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, None,
                          f"pass a side in latent px (e.g. {name}=128), or null for no tiling")
        if self.compile is not None and self.compile not in (*COMPILE_MODES, "auto"):
            raise ConfigError(f"unknown compile mode {self.compile!r}: use auto, {', '.join(COMPILE_MODES)}, or null "
                              "for eager")
        check_flag("channels_last", self.channels_last)
        check_flag("winograd", self.winograd)


def resolve_compile(mode: str | None, device, images: float = math.inf) -> str | None:
    """The compile mode of a job of ``images`` images on ``device``: ``mode`` itself unless it is "auto"; "auto" is
    COMPILE_AUTO on CUDA for at least COMPILE_AUTO_MIN_IMAGES images (a big folder, a server) and eager otherwise.
    Why: compiled, a 512->1024 image took 0.22 s on an H200 against 0.49 s eager (docs/performance.md), while the
    first call waits for the compile (seconds with a warm kernel cache, about a minute cold); on a CPU inductor
    takes ~2 min per graph and the eager path has its own Winograd convolutions."""
    if mode != "auto":
        return mode
    return COMPILE_AUTO if torch.device(device).type == "cuda" and images >= COMPILE_AUTO_MIN_IMAGES else None


def check_speed(**knobs) -> None:
    """One-line ConfigErrors for bad :class:`Speed` knobs, before any weights are loaded."""
    Speed(**knobs)


def resolve_dtype(dtype, device) -> torch.dtype:
    """A torch dtype from a name; ``auto`` is float16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")
    return DTYPES[dtype]
