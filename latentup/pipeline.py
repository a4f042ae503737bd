"""The user-facing 2x upscaler: image or SD latent in, 2x image or latent out.

    image --clean--> (picture inputs, ``restore``: the weights' cleaner removes wear, ``latentup.nn.cleaner``;
                      "auto" blends it in by how worn the picture looks, ``latentup.wear``)
          --encode--> low-res latent z (SD-scaled) --(text, seed)--> x ~ N(0, sigma_max^2)
          --sampler(D, sigmas)--> 2x latent --decode--> image
          --> back-projection (picture inputs, ``back_projection`` > 0: the output made to downscale to the (cleaned)
              picture)
          --> colour fix (image outputs, ``colour_fix`` > 0: the low band of the input's pixels, ``latentup.colour_fix``)

With the released weights, ``sampler="euler"``, ``schedule="log_linear"`` and the same seed, prompt and guidance,
the result equals diffusers' StableDiffusionLatentUpscalePipeline (SPEC §3): one CPU generator per sample,
consumed first by the VAE posterior sample (pixel input) and then by the initial noise.

Settings (``latentup.settings.Settings``) are passed per call; the speed and memory knobs
(``latentup.settings.Speed``, docs/performance.md) are fixed per Upscaler, and :meth:`Upscaler.with_options` gives
another Upscaler over the same weights.
"""

import copy
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from latentup.autoencoders import Autoencoder, load_autoencoder
from latentup.colour_fix import back_project, colour_fix
from latentup.devices import resolve_device
from latentup.diffusion.conditioning import denoiser_conditioning, pooled_width
from latentup.diffusion.compiled import compiled
from latentup.diffusion.graphed import GraphedDenoiser
from latentup.diffusion.guidance import uses_guidance
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.sampling import sample
from latentup.diffusion.schedules import make_sigmas
from latentup.diffusion.tiling import TiledDenoiser
from latentup.errors import ConfigError, InputError, WeightsMismatchError
from latentup.imageio import from_tensor, list_images, load_image, pad_to_multiple, split_alpha, to_tensor
from latentup.nn.cleaner import Cleaner, CleanerConfig
from latentup.nn.unet import UNet
from latentup.nn.winograd import Conv3x3
from latentup.seeds import image_seed
from latentup.settings import SETTING_NAMES, Settings, Speed, check_flag, resolve_compile, resolve_dtype
from latentup.weights.sources import resolve_weights
from latentup.wear import wear_strength
from latentup.weights.strict import build_strict


def _per_sample(value, n: int, name: str) -> list:
    values = value if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} entries for a batch of {n}: give one or {n}")
    return list(values)


def _sharing_weights(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree that holds the same parameters and buffers but attributes of its own (flags such
    as ``Conv3x3.winograd`` or ``Autoencoder.tile_size``): setting one on the copy leaves the original as it was."""
    view = copy.copy(module)
    view.__dict__.update(_modules={name: None if child is None else _sharing_weights(child)
                                   for name, child in module._modules.items()},
                         _parameters=dict(module._parameters), _buffers=dict(module._buffers))
    return view


@contextmanager
def _job(progress: bool, units: int, count: int, noun: str = "image"):
    """One bar over a job's units (encode, each sampling step, decode; ``bar.update`` per unit), and with
    ``progress`` the time per image (or latent) on stderr at the end: the one timing line of infer.py too."""
    start = time.perf_counter()
    with tqdm(total=units, desc="upscale", unit="step", disable=not progress, leave=False) as bar:
        yield bar
    if progress:
        seconds = time.perf_counter() - start
        print(f"upscaled {count} {noun}{'s' * (count != 1)} in {seconds:.2f} s ({seconds / count:.2f} s per {noun})",
              file=sys.stderr)


class Upscaler:
    """A U-Net denoiser, an autoencoder and (for text-conditioned weights) a CLIP text conditioner.

    Thread safety: an Upscaler changes no state after construction. Settings are passed per call, the speed knobs
    are fixed per object (:meth:`with_options` returns a new Upscaler over the same weights) and live on module
    copies of its own, so one Upscaler, or several sharing weights, may serve concurrent callers (one request per
    thread), with two provisos: nothing may change the weights meanwhile (training, ``.to()``, loading), and
    ``compile="reduce-overhead"`` records CUDA graphs that one thread at a time should replay.
    """

    def __init__(self, unet: UNet, autoencoder: Autoencoder, text=None, noise_fourier=None, meta: dict | None = None,
                 cleaner: Cleaner | None = None, **speed):
        """``speed``: the knobs of :class:`latentup.settings.Speed`; ``cleaner`` restores worn pictures (setting
        ``restore``). The modules are shared, never changed."""
        config = unet.config
        if autoencoder.latent_channels != config.in_channels // 2:
            raise ConfigError(f"the autoencoder makes {autoencoder.latent_channels}-channel latents but these weights "
                              f"expect {config.in_channels // 2}: pass the autoencoder they were trained with")
        self.pooled_dim = pooled_width(config.mapping_cond_dim)
        if (config.cross_attention_dim or self.pooled_dim) and text is None:
            raise ConfigError("these weights are text-conditioned but no text encoder was given: "
                              "pass text_encoder=PATH")
        self.speed = Speed(**speed)
        align = 2 ** (len(config.channels) - 1)
        tile = self.speed.unet_tile
        if tile is not None and tile % align:
            raise ConfigError(f"unet_tile must be a multiple of {align} for these weights, got {tile}: "
                              f"e.g. unet_tile={max(align, tile // align * align)}")
        self.text, self.noise_fourier, self.meta = text, noise_fourier, meta or {}
        self.cleaner = None if cleaner is None else _sharing_weights(cleaner).eval()
        self.unet, self.autoencoder = _sharing_weights(unet).eval(), _sharing_weights(autoencoder).eval()
        self.autoencoder.tile_size = self.speed.vae_tile
        winograd = self.speed.winograd
        winograd = winograd if winograd is not None else self.device.type == "cpu" and self.dtype == torch.float32
        for module in self.unet.modules():
            if isinstance(module, Conv3x3):
                module.winograd = winograd
        self.channels_last = bool(self.speed.channels_last)  # None: NCHW, faster on an H200 and on CPUs (measured)
        mode = resolve_compile(self.speed.compile, self.device)
        self.denoiser = KarrasDenoiser(compiled(self.unet, mode) if mode else self.unet)
        if self.device.type == "cuda" and not mode:  # one CUDA graph per sampling call
            self.denoiser = GraphedDenoiser(self.denoiser)
        if tile is not None:
            self.denoiser = TiledDenoiser(self.denoiser, tile, align=align)

    def with_options(self, **speed) -> "Upscaler":
        """A new Upscaler over the same weights with these speed knobs (:class:`latentup.settings.Speed`) changed
        and the others kept; this one is left as it is."""
        return Upscaler(self.unet, self.autoencoder, self.text, self.noise_fourier, self.meta, self.cleaner,
                        **{**asdict(self.speed), **speed})

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
        ``speed``: the knobs of :class:`latentup.settings.Speed`; with channels_last the weights are stored NHWC.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_flag("download", download)
        knobs = Speed(**speed)
        parts = resolve_weights(weights)
        unet = build_strict(lambda: UNet(parts.unet_config), parts.unet_state, "U-Net", dtype).to(device, dtype)
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
        cleaner = None
        if parts.cleaner_state is not None:  # small: float32 on every device
            try:
                config = CleanerConfig(**parts.meta["cleaner"])
            except TypeError as error:
                raise WeightsMismatchError(f"{weights}: unusable cleaner config ({error}); export the weights "
                                           "again") from None
            cleaner = build_strict(lambda: Cleaner(config), parts.cleaner_state, "cleaner", torch.float32).to(device)
        layout = torch.channels_last if knobs.channels_last else torch.contiguous_format
        return cls(unet.to(memory_format=layout), vae.to(device, dtype, memory_format=layout), text,
                   parts.noise_fourier, parts.meta, cleaner, **speed)

    def settings(self, **given) -> Settings:
        """Settings from the caller's values, else the weights' recommended ones, else the defaults."""
        recommended = {k: v for k, v in self.meta.get("recommended", {}).items() if k in SETTING_NAMES}
        settings = Settings(**{**recommended, **{k: v for k, v in given.items() if v is not None}}).validate()
        if self.text is not None:
            self.text.context_layer(settings.clip_skip)  # clip_skip beyond the text tower's layers fails here
        if settings.restore and self.cleaner is None:
            raise ConfigError("restore=true needs weights with a cleaner (the bundled model has one): "
                              "drop restore or pass such weights")
        return settings

    # ---- the one path: (pixels ->) latent -> sampler -> latent (-> pixels) -------------------------------------
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC activations with ``channels_last`` (the convolutions keep the layout of their input)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @staticmethod
    def _seeds(seed, batch: int) -> list[int]:
        """The seed of each sample: the list given, or ``image_seed(seed, i)`` for sample i."""
        seeds = seed if isinstance(seed, (list, tuple)) else [image_seed(seed, i) for i in range(batch)]
        return [int(s) for s in _per_sample(seeds, batch, "seed")]

    @staticmethod
    def _generators(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def _conditioning(self, low_res, sigma_lr, lr_noise, settings: Settings) -> tuple[dict, dict | None]:
        """The denoiser's conditioning of each half: (cond, uncond or None without guidance)."""
        batch = len(low_res)
        common = {"noise_weight": self.noise_fourier, "mapping_cond_dim": self.unet.config.mapping_cond_dim,
                  "lr_noise": lr_noise, "dtype": self.dtype}
        if self.text is None:
            return denoiser_conditioning(low_res, sigma_lr, **common), None
        prompts = _per_sample(settings.prompt, batch, "prompt")
        if settings.cfg_scale == 0:  # as diffusers: no guidance also means no prompt
            prompts = [""] * batch
        guidance = uses_guidance(settings.cfg_scale)
        negatives = _per_sample(settings.negative_prompt, batch, "negative_prompt") if guidance else []
        out = self.text.encode(prompts + negatives, clip_skip=settings.clip_skip)  # one text pass for both halves

        def half(rows: slice) -> dict:
            pooled = out.pooled[rows] if self.pooled_dim else None
            return denoiser_conditioning(low_res, sigma_lr, pooled=pooled, context=out.context[rows].to(self.dtype),
                                         **common)

        return half(slice(0, batch)), half(slice(batch, None)) if guidance else None

    def _sample(self, low_res: torch.Tensor, generators: list[torch.Generator], settings: Settings,
                bar) -> torch.Tensor:
        """2x latent for an SD-scaled low-res latent [B, C, h, w] (sides multiples of 4, >= 8); sample i draws its
        noise from ``generators[i]``: the initial noise, then the augmentation noise, then fresh noise per step."""
        batch, channels, h, w = low_res.shape
        expected = self.unet.config.in_channels // 2
        if channels != expected:
            name = self.meta.get("autoencoder") or type(self.autoencoder).__name__
            raise InputError(f"latent has {channels} channels but the model expects {expected}: use a latent made by "
                             f"the autoencoder these weights were trained with ({name}), or pass the image instead")

        def draw(shape):
            return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]).to(
                self.device)

        bar.set_description_str("sample")
        noise = draw((channels, 2 * h, 2 * w))
        lr_noise = draw((channels, h, w)) if settings.noise_level > 0 else None
        sigma_lr = torch.full((batch,), float(settings.noise_level), device=self.device)
        cond, uncond = self._conditioning(low_res.to(self.device), sigma_lr, lr_noise, settings)
        cond, uncond = ({**c, "image_cond": self._layout(c["image_cond"])} if c else None for c in (cond, uncond))
        return sample(self.denoiser, self._layout(noise), make_sigmas(settings.schedule, settings.steps), cond,
                      sampler=settings.sampler, sampler_options=settings.sampler_options,
                      cfg_scale=settings.cfg_scale, uncond=uncond, fresh_noise=lambda x: draw(x.shape[1:]),
                      progress=bar.update)

    def _latent(self, latent: torch.Tensor, settings: Settings, bar) -> torch.Tensor:
        padded, (h, w) = pad_to_multiple(latent, 4, 8)
        out = self._sample(padded, self._generators(self._seeds(settings.seed, len(latent))), settings, bar)
        return out[..., : 2 * h, : 2 * w].float()

    def _decode(self, latent: torch.Tensor, bar) -> torch.Tensor:
        bar.set_description_str("decode")
        image = self.autoencoder.decode(self._layout(latent.to(self.device, self.dtype)))
        bar.update()
        return image

    # ---- the public calls -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def upscale_latent(self, latent: torch.Tensor, progress=False, **settings) -> torch.Tensor:
        """SD-scaled latent [B, C, h, w] (any size; reflect-padded to the size rule) -> [B, C, 2h, 2w] float32."""
        s = self.settings(**settings)
        with _job(progress, s.steps, len(latent), "latent") as bar:
            return self._latent(latent, s, bar)

    @torch.no_grad()
    def upscale_latent_to_image(self, latent: torch.Tensor, progress=False, **settings) -> torch.Tensor:
        """SD-scaled latent [B, C, h, w] -> the decoded 2x image [B, 3, 16h, 16w] in [0, 1], float32. With
        ``colour_fix`` > 0 its low band comes from decode(latent), the only pixels a latent input has
        (``back_projection`` needs a picture: it is not applied here)."""
        s = self.settings(**settings)
        with _job(progress, s.steps + 1 + bool(s.colour_fix), len(latent)) as bar:
            image = self._decode(self._latent(latent, s, bar), bar)
            if s.colour_fix:
                image = colour_fix(image, self._decode(latent, bar), s.colour_fix)
        return image.float()

    @torch.no_grad()
    def upscale_images(self, images: list[Image.Image | str | Path], seeds: list[int], progress=False,
                       **settings) -> list[Image.Image]:
        """Images of one size (PIL or paths; RGB/RGBA/greyscale) -> their 2x upscales as PIL images, in one batch,
        each in its input's mode (``latentup.imageio``: 16-bit greyscale comes back 16-bit).

        Image i is encoded with its own generator, seeded ``seeds[i]``, and sampled with it; ``prompt`` and
        ``negative_prompt`` may be lists (one per image). Each output equals ``upscale_image(images[i],
        seed=seeds[i], **settings)`` up to float rounding (a batch may round a convolution differently).
        """
        if "seed" in settings:
            raise ConfigError("upscale_images takes seeds=[one per image], not seed=")
        images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
        if len({im.size for im in images}) > 1:
            sizes = sorted({f"{im.width}x{im.height}" for im in images})
            raise InputError(f"upscale_images needs images of one size, got {', '.join(sizes)}: batch them by size")
        seeds = _per_sample(list(seeds), len(images), "seeds")
        parts = [split_alpha(im) for im in images]
        pixels = torch.cat([to_tensor(rgb) for rgb, _, _ in parts])
        decoded = self.upscale_pixels(pixels, progress, seed=seeds, **settings)
        return [from_tensor(image, alpha, mode) for image, (_, alpha, mode) in zip(decoded, parts)]

    @torch.no_grad()
    def upscale_pixels(self, pixels: torch.Tensor, progress=False, **settings) -> torch.Tensor:
        """RGB pictures [B, 3, h, w] in [0, 1] (any size; reflect-padded to the size rule) -> their 2x upscales
        [B, 3, 2h, 2w] in [0, 1], float32: the picture path of ``upscale_images`` (sample i encoded and sampled
        with its own generator; with ``colour_fix`` > 0 the low band comes from the pictures themselves, and with
        ``back_projection`` > 0 the result is made to downscale to them, ``latentup.colour_fix``). With ``restore``
        the weights' cleaner first removes the pictures' wear ("auto": blended in as worn as each picture looks,
        ``latentup.wear``), and the fixes take the cleaned pictures."""
        s = self.settings(**settings)
        factor = 4 * self.autoencoder.downscale
        generators = self._generators(self._seeds(s.seed, len(pixels)))
        with _job(progress, s.steps + 2 + bool(s.restore), len(pixels)) as bar:
            pixels = pixels.to(self.device)
            if s.restore:
                bar.set_description_str("clean")
                cleaned = self.cleaner(pixels.float())
                strength = wear_strength(pixels).view(-1, 1, 1, 1) if s.restore == "auto" else 1.0
                pixels = pixels + strength * (cleaned - pixels)
                bar.update()
            padded, (h, w) = pad_to_multiple(pixels, factor, 2 * factor)
            bar.set_description_str("encode")
            latent = self.autoencoder.encode(self._layout(padded.to(dtype=self.dtype)), generator=generators)
            bar.update()
            decoded = self._decode(self._sample(latent.float(), generators, s, bar), bar)
        decoded = back_project(decoded, padded, s.back_projection)
        return colour_fix(decoded, padded, s.colour_fix)[..., : 2 * h, : 2 * w].float()

    def upscale_image(self, image: Image.Image | str | Path, progress=False, **settings) -> Image.Image:
        """One image (PIL or path; any size, RGB/RGBA/greyscale) -> its 2x upscale as a PIL image."""
        seed = self.settings(**settings).seed  # the caller's, else the weights' recommended one, else the default
        settings = {k: v for k, v in settings.items() if k != "seed"}
        return self.upscale_images([image], self._seeds(seed, 1), progress, **settings)[0]

    def __call__(self, images, progress=False, **settings) -> list[Image.Image]:
        """Upscale one image, a list of images/paths, or every image of a folder (image i: ``image_seed``)."""
        if isinstance(images, (str, Path)) and Path(images).is_dir():
            images = list_images(images)
        images = images if isinstance(images, (list, tuple)) else [images]
        seed = settings.pop("seed", None)
        return [self.upscale_image(im, progress=progress, seed=image_seed(seed, i), **settings)
                for i, im in enumerate(images)]


DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "latentup-x2-taesd.safetensors"


def default_weights() -> Path:
    """The bundled default model: a text-free 2x upscaler trained by latentup in the TAESD SD1/2 latent space."""
    if not DEFAULT_WEIGHTS.is_file():
        from latentup.errors import WeightsNotFoundError

        raise WeightsNotFoundError(f"the bundled default model {DEFAULT_WEIGHTS.name} is missing: pass weights=PATH")
    return DEFAULT_WEIGHTS
