"""Autoencoders between [0, 1] RGB images and SD-scaled latents: the SD KL-f8 VAE and TAESD."""

from pathlib import Path

from latentup.autoencoders.base import Autoencoder
from latentup.autoencoders.kl import AutoencoderKL
from latentup.autoencoders.taesd import TAESD
from latentup.errors import WeightsNotFoundError

TAESD_NAMES = {"taesd": "sd", "taesdxl": "sdxl", "taesd3": "sd3", "taef1": "flux"}

__all__ = ["Autoencoder", "AutoencoderKL", "TAESD", "load_autoencoder"]


def load_autoencoder(spec: str | Path | None, download: bool = False, **kw) -> Autoencoder:
    """Build an autoencoder from a name or a path.

    "taesd" | "taesdxl" | "taesd3" | "taef1": TAESD from the weights folder (HF download if ``download``);
    a diffusers ``vae/`` folder, or a folder containing ``vae/``: ``AutoencoderKL.from_diffusers``;
    a ``.safetensors/.ckpt/.pth`` file (VAE or full SD checkpoint): ``AutoencoderKL.from_single_file``
    (``kw``: KLConfig overrides such as ``scaling_factor``).
    """
    if spec is None:
        raise WeightsNotFoundError("no autoencoder given: set LATENTUP_SD_VAE to a VAE path or pass "
                                   "autoencoder.spec=taesd|taesdxl|taesd3|taef1|PATH")
    if str(spec) in TAESD_NAMES:
        return TAESD.from_weights_folder(TAESD_NAMES[str(spec)], download=download)
    path = Path(spec).expanduser()
    if path.is_file():
        return AutoencoderKL.from_single_file(path, **kw)
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return AutoencoderKL.from_diffusers(folder)
    raise WeightsNotFoundError(f"autoencoder {str(spec)!r} is neither {', '.join(TAESD_NAMES)} nor a VAE file or "
                               "a diffusers folder with vae/config.json; check the path")
