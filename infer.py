"""Upscale an image, a folder of images, an SD latent, or a file of hosted-API tasks by 2x.

    python infer.py input=photo.jpg                                  # -> photo_x2.png, bundled default model
    python infer.py weights=sd-x2-latent-upscaler/ input=photos/ output=big/ prompt="a photo" cfg_scale=7
    python infer.py weights=... input=latent.safetensors output=latent_x2.safetensors
    python infer.py weights=... task=tasks.json output=outputs/      # prints {"data": [...]} on stdout
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm.auto import tqdm

from latentup.errors import ConfigError, InputError, LatentupError, exit_on_error
from latentup.imageio import list_images, load_image, load_latent, save_image, save_latent


def _default_output(source: Path, suffix: str | None = None) -> Path:
    if source.is_dir():
        return source.with_name(source.name + "_x2")
    return source.with_name(f"{source.stem}_x2{suffix or source.suffix}")


def _settings(cfg: DictConfig) -> dict:
    keys = ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler", "schedule", "clip_skip",
            "noise_level", "colour_fix")
    return {k: cfg[k] for k in keys}


def _check_settings(settings: dict) -> None:
    """Validate values before any weights are loaded, so bad input fails fast."""
    from latentup.pipeline import Settings

    Settings(**{k: v for k, v in settings.items() if v is not None}).validate()


def _load(cfg: DictConfig):
    import torch

    from latentup.pipeline import Upscaler, default_weights

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    weights = cfg.weights if cfg.weights is not None else default_weights()
    return Upscaler.from_pretrained(weights, device=device, dtype=cfg.dtype, autoencoder=cfg.autoencoder,
                                    text_encoder=cfg.text_encoder, download=cfg.download, unet_tile=cfg.unet_tile,
                                    vae_tile=cfg.vae_tile, channels_last=cfg.channels_last, compile=cfg.compile,
                                    winograd=cfg.winograd)


def run(cfg: DictConfig) -> None:
    settings = _settings(cfg)
    _check_settings(settings)
    if cfg.task is not None:
        from latentup.serve.tasks import run_tasks, validate_tasks

        path = Path(cfg.task)
        try:
            tasks = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            reason = type(error).__name__
            raise InputError(f"task file {path} is not readable JSON ({reason}): check the file") from None
        validate_tasks(tasks)
        response = run_tasks(_load(cfg), tasks, Path(cfg.output or "outputs"), progress=cfg.progress)
        print(json.dumps(response, indent=2))
        if "errors" in response:
            first = response["errors"][0]["message"]
            raise LatentupError(f"{len(response['errors'])} of {len(tasks)} tasks failed: {first}")
        return
    if cfg.input is None:
        raise ConfigError("nothing to do: pass input=IMAGE|FOLDER|LATENT.safetensors or task=FILE.json")
    source = Path(cfg.input)
    if not source.exists():
        raise InputError(f"input {source} does not exist: check the path")
    if source.suffix == ".safetensors":
        latent = load_latent(source)
        output = Path(cfg.output) if cfg.output else _default_output(source)
        if settings["colour_fix"]:
            raise ConfigError("colour_fix acts on images, but a latent input gives a latent output: drop colour_fix")
        if output.suffix != ".safetensors":
            raise ConfigError(f"a latent input needs a .safetensors output, got {output}")
        upscaler = _load(cfg)
        save_latent(upscaler.upscale_latent(latent, progress=cfg.progress, **settings), output)
        print(f"wrote {output} {tuple(latent.shape)} -> 2x")
        return
    if source.is_dir():
        files = list_images(source)
        for file in files:  # fail on a corrupt file before any work
            load_image(file)
        output = Path(cfg.output) if cfg.output else _default_output(source)
        upscaler = _load(cfg)
        seed = settings.pop("seed")
        for i, file in enumerate(tqdm(files, desc="upscaling", disable=not cfg.progress)):
            save_image(upscaler.upscale_image(file, seed=seed + i, **settings), output / file.name)
        print(f"wrote {len(files)} images to {output}")
        return
    image = load_image(source)
    output = Path(cfg.output) if cfg.output else _default_output(source, ".png")
    if output.exists() and output.is_dir():
        output = output / source.name
    upscaler = _load(cfg)
    save_image(upscaler.upscale_image(image, progress=cfg.progress, **settings), output)
    print(f"wrote {output} ({image.width}x{image.height} -> {2 * image.width}x{2 * image.height})")


@hydra.main(version_base=None, config_path="configs/infer", config_name="infer")
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        run(cfg)


if __name__ == "__main__":
    main()
