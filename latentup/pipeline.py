"""The user-facing 2x upscaler: image or SD latent in, 2x image or latent out.

    low-res latent z (SD-scaled) --(text, seed)--> x ~ N(0, sigma_max^2) --sampler(D, sigmas)--> 2x latent --> decode
    --> colour fix (image outputs, ``colour_fix`` > 0: the low band of the input's pixels, ``latentup.colour_fix``)

With the released weights, ``sampler="euler"``, ``schedule="log_linear"`` and the same seed, prompt and guidance,
the result equals diffusers' StableDiffusionLatentUpscalePipeline (SPEC §3): one CPU generator per sample,
consumed first by the VAE posterior sample (pixel input) and then by the initial noise.

Speed and memory knobs (``configure``; docs/performance.md): channels_last, torch.compile, and tiling of the
denoiser / autoencoder above a latent size. Below the tile sizes none of them changes the result beyond float
rounding.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from latentup.autoencoders import Autoencoder, load_autoencoder
from latentup.colour_fix import colour_fix
from latentup.devices import resolve_device
from latentup.diffusion.conditioning import augment_low_res, low_res_conditioning
from latentup.diffusion.guidance import guided
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.samplers import get_sampler
from latentup.diffusion.schedules import make_sigmas
from latentup.diffusion.tiling import TiledDenoiser
from latentup.errors import ConfigError, InputError
from latentup.imageio import load_image, merge_alpha, pad_to_multiple, split_alpha, to_pil, to_tensor
from latentup.nn.unet import UNet
from latentup.nn.winograd import Conv3x3
from latentup.weights.sources import resolve_weights
from latentup.weights.strict import load_strict

VAE_TILE = 128  # default autoencoder tile (latent px): outputs up to 1024 px decode whole
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_STEPS = 1000  # the length of SD's training noise table; more steps only cost time
MAX_SEED = 2**63 - 1
NUMBER_HINTS = {"cfg_scale": "0 = no guidance, > 1 = classifier-free guidance", "noise_level": "0 = no augmentation",
                "colour_fix": "a blur sigma in output px, 0 = off"}


def _check_int(name: str, value, low: int, high: int | None, hint: str) -> None:
    """A ConfigError unless ``value`` is an int (not a bool) in low..high (no upper bound for None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"{name} must be {bounds} (an integer), got {value!r}: {hint}")


def check_flag(name: str, value) -> None:
    """A ConfigError unless ``value`` is a bool or None."""
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true, false or null, got {value!r}: pass {name}=true or {name}=false")


@dataclass
class Settings:
    """Sampling knobs (the hosted API's names in brackets)."""

    prompt: str | list[str] = ""  # [positivePrompt]
    negative_prompt: str | list[str] = ""  # [negativePrompt]
    seed: int | list[int] = 0  # [seed]; 0..MAX_SEED, sample i of a batch uses seed + i
    steps: int = 20  # [steps]; 1..MAX_STEPS
    cfg_scale: float = 0.0  # [CFGScale]; <= 1 disables guidance, 0 also empties the prompt (as diffusers)
    sampler: str = "euler"
    schedule: str = "log_linear"
    clip_skip: int = 1  # [clipSkip]; 1 (or 0) = last layer, at most the text tower's depth
    noise_level: float = 0.0  # low-res noise augmentation sigma_lr (needs k-diffusion/latentup weights)
    colour_fix: float = 0.0  # image outputs: low band (Gaussian sigma, output px) from the input; 0 = off

    def validate(self):
        """One-line ConfigErrors for values of the wrong type or out of range; returns self."""
        get_sampler(self.sampler)
        _check_int("steps", self.steps, 1, MAX_STEPS, "e.g. steps=20")
        make_sigmas(self.schedule, self.steps)
        for seed in self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]:
            _check_int("seed", seed, 0, MAX_SEED, "e.g. seed=0")
        _check_int("clip_skip", self.clip_skip, 0, None, "0 or 1 = last CLIP layer, 2 = penultimate")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not all(isinstance(text, str) for text in (value if isinstance(value, (list, tuple)) else [value])):
                raise ConfigError(f"{name} must be text or a list of texts, got {value!r}: quote it ({name}='...')")
        for name, hint in NUMBER_HINTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be >= 0 (a finite number; {hint}), got {value!r}")
        return self


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


def resolve_dtype(dtype, device) -> torch.dtype:
    """A torch dtype from a name; ``auto`` is float16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")
    return DTYPES[dtype]


def check_speed(unet_tile=None, vae_tile=VAE_TILE, channels_last=None, compile=None, winograd=None) -> None:
    """One-line ConfigErrors for bad :meth:`Upscaler.configure` knobs, before any weights are loaded."""
    for name, tile in (("unet_tile", unet_tile), ("vae_tile", vae_tile)):
        if tile is not None:
            _check_int(name, tile, 1, None, f"pass a side in latent px (e.g. {name}=128), or null for no tiling")
    if compile is not None and compile not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {compile!r}: use {', '.join(COMPILE_MODES)}, or null for eager")
    check_flag("channels_last", channels_last)
    check_flag("winograd", winograd)


def _as_list(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} entries for a batch of {n}: give one or {n}")
    return values


class Upscaler:
    """A U-Net denoiser, an autoencoder and (for text-conditioned weights) a CLIP text conditioner."""

    def __init__(self, unet: UNet, autoencoder: Autoencoder, text=None, noise_fourier=None, meta: dict | None = None,
                 **speed):
        if autoencoder.latent_channels != unet.config.in_channels // 2:
            raise ConfigError(f"the autoencoder makes {autoencoder.latent_channels}-channel latents but these weights "
                              f"expect {unet.config.in_channels // 2}: pass the autoencoder they were trained with")
        self.unet, self.autoencoder, self.text = unet.eval(), autoencoder.eval(), text
        self.configure(**speed)
        self.noise_fourier = noise_fourier
        self.meta = meta or {}
        cfg = unet.config
        self.pooled_dim = cfg.mapping_cond_dim - 128 if cfg.mapping_cond_dim > 128 else 0
        if (cfg.cross_attention_dim or self.pooled_dim) and text is None:
            raise ConfigError("these weights are text-conditioned but no text encoder was given: "
                              "pass text_encoder=PATH")

    def configure(self, *, unet_tile: int | None = None, vae_tile: int | None = VAE_TILE,
                  channels_last: bool | None = None, compile: str | None = None,
                  winograd: bool | None = None) -> "Upscaler":
        """Speed and memory knobs; sizes are latent pixels of the output (8 image pixels each).

        unet_tile: above this side the denoiser runs on overlapping tiles of this side (None: never; inexact, since
        the deepest level's self-attention then sees one tile). vae_tile: the same for the autoencoder's encode and
        decode (None: never). channels_last: NHWC weights, so activations follow (None: on CUDA only).
        compile: a ``torch.compile`` mode for the U-Net ("default", "reduce-overhead" adds CUDA graphs,
        "max-autotune", "max-autotune-no-cudagraphs"), or None for eager. winograd: the U-Net's 3×3 convolutions as
        Winograd F(4×4, 3×3) (``latentup.nn.winograd``; CPU float32 only, within ~2e-5 relative; None: on where it
        applies). Bad values fail with a one-line ConfigError before anything changes.
        """
        check_speed(unet_tile, vae_tile, channels_last, compile, winograd)
        align = 2 ** (len(self.unet.config.channels) - 1)
        if unet_tile is not None and unet_tile % align:
            raise ConfigError(f"unet_tile must be a multiple of {align} for these weights, got {unet_tile}: "
                              f"e.g. unet_tile={max(align, unet_tile // align * align)}")
        nhwc = channels_last if channels_last is not None else self.device.type == "cuda"
        fast_convs = winograd if winograd is not None else self.device.type == "cpu" and self.dtype == torch.float32
        for module in self.unet.modules():
            if isinstance(module, Conv3x3):
                module.winograd = fast_convs
        for module in (self.unet, self.autoencoder):
            module.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        self.autoencoder.tile_size = vae_tile
        network = torch.compile(self.unet, mode=compile) if compile else self.unet
        self.denoiser = KarrasDenoiser(network)
        if unet_tile is not None:
            self.denoiser = TiledDenoiser(self.denoiser, unet_tile, align=align)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @classmethod
    def from_pretrained(cls, weights, *, device="cpu", dtype="auto", autoencoder=None, text_encoder=None,
                        download=False, **speed):
        """Load any supported weights (diffusers folder, latentup file, k-diffusion checkpoint).

        ``autoencoder``: an Autoencoder, or a spec for :func:`load_autoencoder` ("taesd", a vae/ folder, a file);
        defaults to the weights' own (a diffusers ``vae/`` or the file's metadata). ``text_encoder``: a
        CLIPTextConditioner or a HF CLIPTextModel folder; defaults to the weights' own ``text_encoder/``.
        ``speed``: the knobs of ``configure``.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_flag("download", download)
        check_speed(**speed)
        parts = resolve_weights(weights)
        unet = load_strict(UNet(parts.unet_config), parts.unet_state, "U-Net").to(device, dtype)
        spec = autoencoder if autoencoder is not None else parts.autoencoder
        if spec is None:
            raise ConfigError(f"no autoencoder known for {weights}: pass autoencoder=taesd or a vae/ folder")
        vae = spec if isinstance(spec, torch.nn.Module) else load_autoencoder(spec, download=download)
        text = text_encoder if text_encoder is not None else parts.text_encoder
        if text is not None and not isinstance(text, torch.nn.Module):
            from latentup.text import CLIPTextConditioner

            text = CLIPTextConditioner.from_hf(text, tokenizer=parts.tokenizer)
        if text is not None:
            text = text.to(device, dtype)
        return cls(unet, vae.to(device, dtype), text, parts.noise_fourier, parts.meta, **speed)

    def _conditioning(self, low_res, settings: Settings, batch: int):
        """Per-half conditioning dicts for the denoiser: (cond, uncond or None)."""
        sigma_lr = torch.full((batch,), float(settings.noise_level), device=self.device)
        image_cond, noise_embed = low_res_conditioning(low_res.to(self.dtype), sigma_lr, self.noise_fourier)
        base = {"image_cond": image_cond, "context": None, "context_mask": None}
        use_noise = self.unet.config.mapping_cond_dim > 0
        if self.text is None:
            cond = {**base, "mapping_cond": noise_embed if use_noise else None}
            return cond, None
        prompts = _as_list(settings.prompt, batch, "prompt")
        if settings.cfg_scale == 0:
            prompts = [""] * batch
        guided_run = settings.cfg_scale > 1

        negatives = _as_list(settings.negative_prompt, batch, "negative_prompt") if guided_run else []
        out = self.text.encode(prompts + negatives, clip_skip=settings.clip_skip)  # one text pass for both halves

        def half(rows: slice) -> dict:
            pooled = out.pooled[rows].to(self.dtype)
            mapping = torch.cat([noise_embed, pooled], dim=1) if self.pooled_dim else noise_embed
            return {**base, "mapping_cond": mapping, "context": out.context[rows].to(self.dtype)}

        return half(slice(0, batch)), half(slice(batch, None)) if guided_run else None

    @torch.no_grad()
    def sample(self, low_res: torch.Tensor, generators: list[torch.Generator], settings: Settings, progress=False):
        """2x latent for an SD-scaled low-res latent [B, C, h, w] (sides multiples of 4, >= 8)."""
        batch, channels, h, w = low_res.shape
        expected = self.unet.config.in_channels // 2
        if channels != expected:
            name = self.meta.get("autoencoder") or type(self.autoencoder).__name__
            raise InputError(f"latent has {channels} channels but the model expects {expected}: use a latent made by "
                             f"the autoencoder these weights were trained with ({name}), or pass the image instead")
        sigmas = make_sigmas(settings.schedule, settings.steps)
        noise = [torch.randn((1, channels, 2 * h, 2 * w), generator=g, dtype=torch.float32) for g in generators]
        x = torch.cat(noise).to(self.device) * sigmas[0]
        low_res = low_res.to(self.device)
        if settings.noise_level > 0:
            eps = torch.cat([torch.randn((1, channels, h, w), generator=g) for g in generators]).to(self.device)
            low_res = augment_low_res(low_res, torch.full((batch,), settings.noise_level, device=self.device), eps)
        cond, uncond = self._conditioning(low_res, settings, batch)
        model = guided(self.denoiser, cond, settings.cfg_scale, uncond, prepare=self.denoiser.prepare)

        def fresh_noise(like):
            return torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators]).to(like.device)

        return get_sampler(settings.sampler)(model, x, sigmas, noise=fresh_noise, progress=progress)

    def settings(self, **given) -> Settings:
        """Settings from the caller's values, else the weights' recommended ones, else the defaults."""
        recommended = {k: v for k, v in self.meta.get("recommended", {}).items() if k in Settings.__dataclass_fields__}
        settings = Settings(**{**recommended, **{k: v for k, v in given.items() if v is not None}}).validate()
        if self.text is not None:
            self.text.context_layer(settings.clip_skip)  # clip_skip beyond the text tower's layers fails here
        return settings

    def generators(self, seed, batch: int) -> list[torch.Generator]:
        seeds = seed if isinstance(seed, (list, tuple)) else [seed + i for i in range(batch)]
        return [torch.Generator("cpu").manual_seed(int(s)) for s in _as_list(seeds, batch, "seed")]

    def upscale_latent(self, latent: torch.Tensor, progress=False, **settings) -> torch.Tensor:
        """SD-scaled latent [B, C, h, w] (any size; reflect-padded to the size rule) -> [B, C, 2h, 2w] float32."""
        s = self.settings(**settings)
        padded, (h, w) = pad_to_multiple(latent, 4, 8)
        out = self.sample(padded, self.generators(s.seed, latent.shape[0]), s, progress)
        return out[..., : 2 * h, : 2 * w].float()

    @torch.no_grad()
    def upscale_latent_to_image(self, latent: torch.Tensor, progress=False, **settings) -> torch.Tensor:
        """SD-scaled latent [B, C, h, w] -> the decoded 2x image [B, 3, 16h, 16w] in [0, 1], float32. With
        ``colour_fix`` > 0 its low band comes from decode(latent), the only pixels a latent input has."""
        s = self.settings(**settings)
        image = self.autoencoder.decode(self.upscale_latent(latent, progress, **settings).to(self.device, self.dtype))
        if s.colour_fix:
            image = colour_fix(image, self.autoencoder.decode(latent.to(self.device, self.dtype)), s.colour_fix)
        return image.float()

    @torch.no_grad()
    def upscale_image(self, image: Image.Image | str | Path, progress=False, **settings) -> Image.Image:
        """One image (PIL or path; any size, RGB/RGBA/greyscale) -> its 2x upscale as a PIL image."""
        image = load_image(image) if isinstance(image, (str, Path)) else image
        s = self.settings(**settings)
        rgb, alpha, mode = split_alpha(image)
        factor = 4 * self.autoencoder.downscale
        pixels, (h, w) = pad_to_multiple(to_tensor(rgb), factor, 2 * factor)
        generators = self.generators(s.seed, 1)
        latent = self.autoencoder.encode(pixels.to(self.device, self.dtype), generator=generators[0])
        out = self.sample(latent.float(), generators, s, progress)
        decoded = colour_fix(self.autoencoder.decode(out.to(self.dtype)), pixels.to(self.device), s.colour_fix)
        decoded = decoded[..., : 2 * h, : 2 * w]
        return merge_alpha(to_pil(decoded)[0], alpha, mode)

    def __call__(self, images, progress=False, **settings) -> list[Image.Image]:
        """Upscale one image, a list of images/paths, or every image of a folder (seed + i for image i)."""
        from latentup.imageio import list_images

        if isinstance(images, (str, Path)) and Path(images).is_dir():
            images = list_images(images)
        images = images if isinstance(images, (list, tuple)) else [images]
        seed = settings.pop("seed", None) or 0
        return [self.upscale_image(im, progress=progress, seed=seed + i, **settings) for i, im in enumerate(images)]


DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "latentup-x2-taesd.safetensors"


def default_weights() -> Path:
    """The bundled default model: a text-free 2x upscaler trained by latentup in the TAESD SD1/2 latent space."""
    if not DEFAULT_WEIGHTS.is_file():
        from latentup.errors import WeightsNotFoundError

        raise WeightsNotFoundError(f"the bundled default model {DEFAULT_WEIGHTS.name} is missing: pass weights=PATH")
    return DEFAULT_WEIGHTS
