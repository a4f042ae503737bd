"""Find weight files on disk: an explicit path, the weights folder, then the Hugging Face cache.

Search order for a file named relative to the weights folder (e.g. ``taesd/taesd_encoder.safetensors``):
1. ``$LATENTUP_WEIGHTS/<relpath>`` (CI points this at ``../shared/weights``);
2. the Hugging Face cache entry ``hub_repo/hub_filename``, looked up without any network access;
3. a download from the hub, only when the caller passes ``download=True`` (``download=true`` on the command line)
   and offline mode (``HF_HUB_OFFLINE``) is off.
"""

import os
from pathlib import Path

from latentup.errors import WeightsNotFoundError

WEIGHTS_ENV = "LATENTUP_WEIGHTS"


def weights_folder() -> Path | None:
    """The folder named by ``$LATENTUP_WEIGHTS``, or None when unset."""
    value = os.environ.get(WEIGHTS_ENV)
    return Path(value).expanduser() if value else None


def find_file(relpath: str, hub_repo: str | None = None, hub_filename: str | None = None, download: bool = False) -> Path:
    """Return an existing path for ``relpath``; raise WeightsNotFoundError with the ways to provide it."""
    folder = weights_folder()
    if folder is not None and (folder / relpath).is_file():
        return folder / relpath
    if hub_repo is not None:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(hub_repo, hub_filename or relpath)
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
        if download and offline():
            raise WeightsNotFoundError(f"{hub_repo}/{hub_filename or relpath} is not in the Hugging Face cache and "
                                       f"HF_HUB_OFFLINE is set: unset it to download, or put the file at "
                                       f"${WEIGHTS_ENV}/{relpath}")
        if download:
            try:
                return Path(hf_hub_download(hub_repo, hub_filename or relpath))
            except Exception as error:  # noqa: BLE001 - any hub failure becomes one clear line
                raise WeightsNotFoundError(
                    f"could not download {hub_repo}/{hub_filename or relpath} ({type(error).__name__}); "
                    f"check the network or put the file at ${WEIGHTS_ENV}/{relpath}"
                ) from None
    where = f"${WEIGHTS_ENV}/{relpath}" + ("" if folder else f" (set {WEIGHTS_ENV} to a weights folder)")
    hub = ""
    if hub_repo:
        fetch = "unset HF_HUB_OFFLINE and pass download=true" if offline() else "pass download=true"
        hub = f", in the Hugging Face cache of {hub_repo}, or {fetch} to fetch it"
    raise WeightsNotFoundError(f"weights file {relpath} not found: put it at {where}{hub}")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
