"""Upscale an image, a folder of images, an SD latent, or a file of hosted-API tasks by 2x.

    python infer.py input=photo.jpg                                  # -> photo_x2.png, bundled default model
    python infer.py weights=sd-x2-latent-upscaler/ input=photos/ output=big/ prompt="a photo" cfg_scale=7
    python infer.py weights=... input=latent.safetensors output=latent_x2.safetensors
    python infer.py weights=... task=tasks.json output=outputs/      # prints {"data": [...]} on stdout
"""

import json
import os
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm.auto import tqdm

from latentup.errors import ConfigError, InputError, LatentupError, exit_on_error
from latentup.imageio import image_format, list_images, load_image, load_latent, save_image, save_latent


def _path(value) -> Path:
    """A path from a Hydra value (which reads a name such as ``123`` as a number)."""
    return Path(str(value))


def _default_output(source: Path, suffix: str | None = None) -> Path:
    if source.is_dir():
        return source.with_name(source.name + "_x2")
    return source.with_name(f"{source.stem}_x2{suffix or source.suffix}")


def _settings(cfg: DictConfig) -> dict:
    keys = ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler", "schedule", "clip_skip",
            "noise_level", "colour_fix")
    return {k: cfg[k] for k in keys}


def _speed(cfg: DictConfig) -> dict:
    return {k: cfg[k] for k in ("unet_tile", "vae_tile", "channels_last", "compile", "winograd")}


def _check_options(cfg: DictConfig, settings: dict) -> None:
    """Validate values before any weights are loaded, so bad input fails fast."""
    from latentup.devices import resolve_device
    from latentup.settings import Settings, check_flag, check_speed, resolve_dtype

    Settings(**{k: v for k, v in settings.items() if v is not None}).validate()
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    check_speed(**_speed(cfg))
    check_flag("download", cfg.download)
    check_flag("progress", cfg.progress)


def _check_writable(path: Path, folder: bool = False) -> None:
    """Before any work: an InputError unless the file (or ``folder``) ``path`` can be written."""
    if os.path.exists(path) and path.is_dir() != folder:
        raise InputError(f"output {path} is an existing {'file' if folder else 'folder'}: choose another output path")
    target = (path if folder else path.parent).absolute()
    existing = next(p for p in (target, *target.parents) if os.path.exists(p))  # folders below it get created
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise InputError(f"cannot write {path}: {existing} is not a writable folder ({error.strerror}): "
                         "choose another output path") from None


def _load(cfg: DictConfig):
    from latentup.pipeline import Upscaler, default_weights

    weights = cfg.weights if cfg.weights is not None else default_weights()
    return Upscaler.from_pretrained(weights, device=cfg.device, dtype=cfg.dtype, autoencoder=cfg.autoencoder,
                                    text_encoder=cfg.text_encoder, download=cfg.download, **_speed(cfg))


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
        failed = run_task_file(tasks, lambda: _load(cfg), output, allow_paths=bool(cfg.task_paths),
                               progress=cfg.progress)
        if failed:
            raise LatentupError(f"{failed} of {len(tasks)} tasks failed: see the errors lines on stdout")
        return
    if cfg.input is None:
        raise ConfigError("nothing to do: pass input=IMAGE|FOLDER|LATENT.safetensors or task=FILE.json")
    source = _path(cfg.input)
    if not source.exists():
        raise InputError(f"input {source} does not exist: check the path")
    if source.suffix == ".safetensors":
        latent = load_latent(source)
        output = _path(cfg.output) if cfg.output else _default_output(source)
        if settings["colour_fix"]:
            raise ConfigError("colour_fix acts on images, but a latent input gives a latent output: drop colour_fix")
        if output.suffix != ".safetensors":
            raise ConfigError(f"a latent input needs a .safetensors output, got {output}")
        _check_writable(output)
        upscaler = _load(cfg)
        save_latent(upscaler.upscale_latent(latent, progress=cfg.progress, **settings), output)
        print(f"wrote {output} {tuple(latent.shape)} -> 2x")
        return
    if source.is_dir():
        files = list_images(source)
        for file in files:  # fail on a corrupt file before any work
            load_image(file)
        output = _path(cfg.output) if cfg.output else _default_output(source)
        for file in files:  # every target before the first write
            _check_writable(output / file.name)
        upscaler = _load(cfg)
        seed = settings.pop("seed") or 0  # null: the default
        for i, file in enumerate(tqdm(files, desc="upscaling", disable=not cfg.progress)):
            save_image(upscaler.upscale_image(file, seed=seed + i, **settings), output / file.name)
        print(f"wrote {len(files)} images to {output}")
        return
    image = load_image(source)
    output = _path(cfg.output) if cfg.output else _default_output(source, ".png")
    if output.is_dir():
        output = output / source.name
    image_format(output)
    _check_writable(output)
    upscaler = _load(cfg)
    save_image(upscaler.upscale_image(image, progress=cfg.progress, **settings), output)
    print(f"wrote {output} ({image.width}x{image.height} -> {2 * image.width}x{2 * image.height})")


@hydra.main(version_base=None, config_path="configs/infer", config_name="infer")
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        run(cfg)


if __name__ == "__main__":
    main()
