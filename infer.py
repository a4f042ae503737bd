"""Upscale an image, a folder of images, an SD latent, or a file of hosted-API tasks by 2x.

    python infer.py input=photo.jpg                                  # -> ./photo_x2.png, bundled default model
    python infer.py weights=sd-x2-latent-upscaler/ input=photos/ output=big/ prompt="a photo" cfg_scale=7
    python infer.py weights=... input=latent.safetensors output=latent_x2.safetensors
    python infer.py weights=... task=tasks.json output=outputs/      # prints {"data": [...]} on stdout

stdout names what was written; with progress=true (the default) stderr has the progress bar and the time per image.
"""

import json
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from latentup.atomic import folder_lock
from latentup.cli import command
from latentup.errors import ConfigError, InputError, LatentupError, exit_on_error
from latentup.imageio import (check_finite, image_format, list_images, load_image, load_latent, save_image,
                              save_latent)
from latentup.seeds import image_seed

FREE_TEXT = ("prompt", "negative_prompt", "input", "output", "weights", "task", "autoencoder", "text_encoder")


def _path(value) -> Path:
    """A path from a Hydra value (which reads a name such as ``123`` as a number)."""
    return Path(str(value))


def _default_output(source: Path, suffix: str | None = None) -> Path:
    """``<input name>_x2`` in the current folder (never beside the input, which may sit in an installed package)."""
    if source.is_dir():
        return Path(source.resolve().name + "_x2")
    return Path(f"{source.stem}_x2{suffix or source.suffix}")


def _settings(cfg: DictConfig) -> dict:
    keys = ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler", "schedule", "clip_skip",
            "noise_level", "colour_fix", "back_projection", "restore")
    return {k: cfg[k] for k in keys}


def _speed(cfg: DictConfig) -> dict:
    return {k: cfg[k] for k in ("unet_tile", "vae_tile", "channels_last", "compile", "winograd")}


def _check_options(cfg: DictConfig, settings: dict) -> None:
    """Validate values before any weights are loaded, so bad input fails fast."""
    from latentup.devices import resolve_device
    from latentup.settings import Settings, check_flag, check_int, check_speed, resolve_dtype

    Settings(**{k: v for k, v in settings.items() if v is not None}).validate()
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    check_speed(**_speed(cfg))
    check_flag("download", cfg.download)
    check_flag("progress", cfg.progress)
    check_flag("overwrite", cfg.overwrite)
    check_int("max_pixels", cfg.max_pixels, 1, None, "e.g. max_pixels=4194304 (2048 x 2048), null: no limit",
              optional=True)


def _check_not_input(output: Path, source: Path) -> None:
    """An InputError when writing ``output`` would replace the input ``source`` (same path, link or folder)."""
    if output.resolve() == source.resolve() or (output.exists() and os.path.samefile(output, source)):
        kind = "folder" if source.is_dir() else "file"
        raise InputError(f"output {output} is the input {kind} {source}: choose another output (inputs are never "
                         "overwritten)")


def _check_writable(path: Path, folder: bool = False, overwrite: bool = True) -> None:
    """Before any work: an InputError unless the file (or ``folder``) ``path`` can be written (and, unless
    ``overwrite``, does not exist yet)."""
    if os.path.exists(path) and path.is_dir() != folder:
        raise InputError(f"output {path} is an existing {'file' if folder else 'folder'}: choose another output path")
    if not folder and not overwrite and os.path.lexists(path):
        raise InputError(f"output {path} exists: pass overwrite=true to replace it, or choose another output")
    target = (path if folder else path.parent).absolute()
    existing = next(p for p in (target, *target.parents) if os.path.exists(p))  # folders below it get created
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise InputError(f"cannot write {path}: {existing} is not a writable folder ({error.strerror}): "
                         "choose another output path") from None


def _load(cfg: DictConfig, images: int = 1):
    """The Upscaler for a job of ``images`` images (compile=auto compiles only for long jobs on CUDA)."""
    from latentup.devices import resolve_device
    from latentup.pipeline import Upscaler, default_weights
    from latentup.settings import resolve_compile

    weights = cfg.weights if cfg.weights is not None else default_weights()
    speed = _speed(cfg) | {"compile": resolve_compile(cfg.compile, resolve_device(cfg.device), images)}
    return Upscaler.from_pretrained(weights, device=cfg.device, dtype=cfg.dtype, autoencoder=cfg.autoencoder,
                                    text_encoder=cfg.text_encoder, download=cfg.download, **speed)


def run(cfg: DictConfig) -> None:
    settings = _settings(cfg)
    _check_options(cfg, settings)
    if cfg.task is not None:  # one JSON line per task on stdout, each as soon as it is answered
        from latentup.serve.tasks import read_task_file, run_task_file
        from latentup.settings import check_flag, check_int

        check_flag("task_paths", cfg.task_paths)  # local image paths in tasks: off unless the operator enables them
        check_int("max_tasks", cfg.max_tasks, 1, None, "e.g. max_tasks=100")
        tasks = read_task_file(_path(cfg.task), cfg.max_tasks)
        output = _path(cfg.output or "outputs")
        _check_writable(output, folder=True)
        failed = run_task_file(tasks, lambda: _load(cfg, len(tasks)), output, allow_paths=bool(cfg.task_paths),
                               progress=cfg.progress)
        if failed:
            raise LatentupError(f"{failed} of {len(tasks)} tasks failed: see the errors lines on stdout")
        return
    if cfg.input is None:
        raise ConfigError("nothing to do: pass input=IMAGE|FOLDER|LATENT.safetensors or task=FILE.json")
    source = _path(cfg.input)
    if not source.exists():
        raise InputError(f"input {source} does not exist: check the path")
    if source.suffix == ".safetensors" and not source.is_dir():
        latent = load_latent(source)
        output = _path(cfg.output) if cfg.output else _default_output(source)
        for name in ("colour_fix", "back_projection", "restore"):
            if settings[name]:
                raise ConfigError(f"{name} acts on images, but a latent input gives a latent output: drop {name}")
        if output.suffix != ".safetensors":
            raise ConfigError(f"a latent input needs a .safetensors output, got {output}")
        _check_not_input(output, source)
        _check_writable(output, overwrite=cfg.overwrite)
        result = _load(cfg).upscale_latent(latent, progress=cfg.progress, **settings)
        check_finite(result, "upscaled latent")
        save_latent(result, output, overwrite=cfg.overwrite)
        print(f"wrote {output} {tuple(latent.shape)} -> 2x")
        return
    if source.is_dir():
        files = list_images(source)
        for file in files:  # fail on a corrupt or oversized file before any work
            load_image(file, cfg.max_pixels)
        output = _path(cfg.output) if cfg.output else _default_output(source)
        _check_not_input(output, source)
        for file in files:  # every target before the first write
            _check_not_input(output / file.name, file)
            _check_writable(output / file.name, overwrite=cfg.overwrite)
        with folder_lock(output):  # a second run into the same folder is refused: results never mix
            upscaler = _load(cfg, len(files))
            seed = settings.pop("seed")
            for i, file in enumerate(files):
                image = upscaler.upscale_image(load_image(file, cfg.max_pixels), seed=image_seed(seed, i),
                                               progress=cfg.progress, **settings)
                save_image(image, output / file.name, overwrite=cfg.overwrite)
                print(f"[{i + 1}/{len(files)}] wrote {output / file.name}")
        print(f"wrote {len(files)} images to {output}")
        return
    image = load_image(source, cfg.max_pixels)
    output = _path(cfg.output) if cfg.output else _default_output(source, ".png")
    if output.is_dir():
        output = output / source.name
    image_format(output)
    _check_not_input(output, source)
    _check_writable(output, overwrite=cfg.overwrite)
    save_image(_load(cfg).upscale_image(image, progress=cfg.progress, **settings), output, overwrite=cfg.overwrite)
    print(f"wrote {output} ({image.width}x{image.height} -> {2 * image.width}x{2 * image.height})")


@command(Path(__file__).parent / "configs" / "infer", "infer", __doc__, FREE_TEXT)
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        run(cfg)


if __name__ == "__main__":
    main()
