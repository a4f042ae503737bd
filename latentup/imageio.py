"""Image and latent files in and out: EXIF orientation, RGBA / greyscale / 16-bit, reflect padding, atomic writes.

Mode in -> mode out: an RGB, RGBA, LA, L or palette input comes back 8-bit in its own kind (palettes as RGB(A)); a
high-bit-depth greyscale input (16-bit, 32-bit integer or float, mapped by its own white) comes back as 16-bit
greyscale ("I;16", the result quantised to 65535 levels), written at 16 bits where the format holds them (PNG, TIFF)
and as 8-bit elsewhere (JPEG, WEBP, BMP). Pillow reads a 48/64-bit RGB(A) PNG as 8-bit RGB(A) (the high byte of
each sample: right brightness, 8-bit precision), so such inputs come back 8-bit.
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentup.atomic import write_atomic
from latentup.errors import InputError, LatentupError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
HIGH_BIT = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1}  # mode -> white
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")  # formats that hold 16-bit greyscale
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B: PIL's RGB -> L


def load_image(path, max_pixels: int | None = None) -> Image.Image:
    """Open an image with its EXIF orientation applied; a one-line InputError when it is missing, a folder, corrupt
    or (read from the header, before decoding) larger than ``max_pixels`` (width x height; None: PIL's own limit)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"input {path} is a folder, not an image: pass an image file (or the folder as input)")
    if not path.is_file():
        raise InputError(f"input image {path} does not exist: check the path")
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # the cap below decides, not PIL's warning threshold
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise InputError(f"input {path} is {width}x{height} = {width * height} pixels, over max_pixels="
                                 f"{max_pixels}: downscale or crop it (or raise max_pixels)")
            image.load()
            return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:  # the header's size is over PIL's limit: refused before decoding
        size = str(error).split(",")[0]
        raise InputError(f"input {path} is too large to open ({size}): downscale or crop it first") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"input {path} is not a readable image ({error.__class__.__name__}): "
                         "use a PNG/JPEG/WEBP file") from None


def list_images(folder) -> list[Path]:
    """Image files of a folder, sorted by name (a sub-folder named like an image is not one); an InputError when
    there are none."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None, str]:
    """(RGB image, alpha channel or None, original mode); palette and greyscale images become RGB, except
    high-bit-depth greyscale (16-bit, 32-bit integer, float), which :func:`to_tensor` reads at full precision."""
    mode = image.mode
    if mode in HIGH_BIT:
        return image, None, mode
    alpha = None
    if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        image = rgba
    return image.convert("RGB"), alpha, mode


def _unit(image: Image.Image) -> np.ndarray:
    """High-bit-depth greyscale -> float32 [H, W] in [0, 1]: its own white (:data:`HIGH_BIT`) is 1, clipped."""
    return np.clip(np.asarray(image, dtype=np.float32) / HIGH_BIT[image.mode], 0, 1)


def _grey(values: np.ndarray, bits: int) -> Image.Image:
    """Greyscale [H, W] in [0, 1] -> a PIL image of ``bits`` 16 ("I;16") or 8 ("L"): round(v * (2^bits - 1))."""
    dtype = np.uint16 if bits == 16 else np.uint8
    return Image.fromarray(np.round(np.clip(values, 0, 1) * np.iinfo(dtype).max).astype(dtype))


def from_tensor(pixels: torch.Tensor, alpha: Image.Image | None, mode: str) -> Image.Image:
    """Undo :func:`split_alpha` on a 2x result [3, H, W] in [0, 1]: the input's mode again (module docstring):
    high-bit-depth greyscale -> 16-bit greyscale of the BT.601 luma, L -> L, RGBA / LA with their alpha enlarged by a
    bicubic filter, else RGB. Non-finite values are refused (they would turn black)."""
    if mode in HIGH_BIT:
        check_finite(pixels, "upscaled image")
        luma = torch.tensordot(torch.tensor(LUMA), pixels.detach().float().cpu(), dims=1)
        return _grey(luma.numpy(), 16)
    rgb = to_pil(pixels[None])[0]
    if mode == "L":
        return rgb.convert("L")
    if alpha is None:
        return rgb
    out = rgb.copy()
    out.putalpha(alpha.resize(rgb.size, Image.BICUBIC))
    return out.convert("LA") if mode == "LA" else out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [1, 3, H, W] in [0, 1]. High-bit-depth greyscale maps its own white to 1
    (65535 for 16-bit and 32-bit integer images, 1.0 for float ones; clipped), repeated on the three channels."""
    if image.mode in HIGH_BIT:
        grey = _unit(image)
        return torch.from_numpy(grey)[None, None].expand(1, 3, *grey.shape).contiguous()
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def check_finite(values: torch.Tensor, what: str) -> None:
    """A one-line LatentupError (nothing gets written) when a result holds NaN or infinite values."""
    if not values.isfinite().all():
        raise LatentupError(f"the {what} holds NaN or infinite values (nothing written): the weights are broken or "
                            "the dtype overflowed; try dtype=float32 or other weights")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> uint8 PIL images (rounded, as diffusers' postprocessing); non-finite values are
    refused (they would turn black)."""
    check_finite(images, "upscaled image")
    arrays = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def _reflect_index(n: int, total: int) -> torch.Tensor:
    """Indices 0..total-1 folded into 0..n-1 by repeated mirror reflection (works for any padding size)."""
    if n == 1:
        return torch.zeros(total, dtype=torch.long)
    period = 2 * (n - 1)
    i = torch.arange(total) % period
    return torch.where(i < n, i, period - i)


def pad_to_multiple(x: torch.Tensor, multiple: int, minimum: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom/right of [B, C, H, W] to sides that are multiples of ``multiple`` and >= ``minimum``."""
    h, w = x.shape[-2:]
    th = max(minimum, -(-h // multiple) * multiple)
    tw = max(minimum, -(-w // multiple) * multiple)
    if (th, tw) == (h, w):
        return x, (h, w)
    x = x.index_select(-2, _reflect_index(h, th).to(x.device))
    return x.index_select(-1, _reflect_index(w, tw).to(x.device)), (h, w)


def image_format(path) -> str:
    """The PIL format that the suffix of ``path`` names; an InputError for an unknown suffix."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot write {path}: unknown image suffix, use .png, .jpg or .webp")
    return fmt


def for_format(image: Image.Image, fmt: str) -> Image.Image:
    """``image`` in a mode the PIL format ``fmt`` holds: high-bit-depth greyscale as 16-bit ("I;16") in PNG and
    TIFF, as 8-bit ("L") elsewhere, mapped by its own white (never clipped, as PIL's own conversion would);
    JPEG drops alpha."""
    if image.mode in HIGH_BIT and not (image.mode == "I;16" and fmt in SIXTEEN_BIT_FORMATS):
        image = _grey(_unit(image), 16 if fmt in SIXTEEN_BIT_FORMATS else 8)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return image


def save_image(image: Image.Image, path, quality: int = 95, overwrite: bool = True) -> Path:
    """Write an image atomically in a mode its format holds (:func:`for_format`); the format follows the suffix.
    ``overwrite=False``: an InputError instead of replacing a file that exists (also one another process wrote
    meanwhile)."""
    path = Path(path)
    fmt = image_format(path)
    image = for_format(image, fmt)
    return write_atomic(path, lambda tmp: image.save(tmp, format=fmt, quality=quality), overwrite=overwrite)


def load_latent(path) -> torch.Tensor:
    """A latent [B, C, h, w] (SD-scaled) from key ``latent`` of a safetensors file; a one-line InputError when it is
    missing, unreadable, empty or not finite."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input latent {path} does not exist: check the path")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path} is not a readable safetensors file ({error.__class__.__name__})") from None
    if "latent" not in tensors:
        found = ", ".join(tensors) or "none"
        raise InputError(f"{path} has no tensor named 'latent' (found: {found}): save it under 'latent'")
    latent = tensors["latent"]
    latent = latent[None] if latent.ndim == 3 else latent
    if latent.ndim != 4 or not latent.numel():
        raise InputError(f"latent in {path} has shape {tuple(latent.shape)}: use a non-empty [B, C, h, w] or [C, h, w]")
    latent = latent.float()
    if not latent.isfinite().all():
        raise InputError(f"latent in {path} holds NaN or infinite values: save a finite one (e.g. re-encode the image)")
    return latent


def save_latent(latent: torch.Tensor, path, overwrite: bool = True) -> Path:
    """Write ``{"latent": latent}`` atomically (``overwrite`` as in :func:`save_image`)."""
    return write_atomic(Path(path), lambda tmp: save_file({"latent": latent.detach().cpu().contiguous()}, tmp),
                        overwrite=overwrite)
