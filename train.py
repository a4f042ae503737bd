"""Train, validate and export latent upscalers (Lightning + Hydra).

    python train.py experiment=quickstart                         # CPU: TAESD latents, small text-free U-Net
    python train.py experiment=quickstart ckpt_path=last          # resume (steps, optimizer, EMA, LR, data position)
    python train.py stage=prepare data.prepare.settings.source=/images data.root=/shards   # latent-pair shards only
    python train.py experiment=sd_x2 trainer=ddp trainer.num_nodes=4                       # the released recipe
    python train.py stage=export ckpt_path=runs/quickstart/checkpoints/last.ckpt           # EMA -> .safetensors
    python train.py stage=validate ckpt_path=last data.module.val.root=$LATENTUP_DATA/eval/B100
"""

import json
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from latentup.cli import command
from latentup.errors import ConfigError, exit_on_error

FREE_TEXT = ("name", "ckpt_path", "paths.data", "paths.weights", "paths.runs", "paths.pairs", "data.root",
             "data.prepare.settings.source", "data.module.val.root")


def resolve_precision(precision):
    """``auto``: bf16-mixed on a GPU that supports bfloat16, else 32-true."""
    import torch

    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def component_name(node: DictConfig | None, key: str) -> str | None:
    """A readable record of which autoencoder / text encoder was used (for manifests and export metadata)."""
    if node is None:
        return None
    value = node.get(key)
    return str(value) if value is not None else OmegaConf.to_yaml(node).strip().replace("\n", "; ")


def build_helpers(cfg: DictConfig):
    """(autoencoder, text encoder or None) from their config groups."""
    from hydra.utils import instantiate

    autoencoder = instantiate(cfg.autoencoder)
    text_encoder = instantiate(cfg.text_encoder) if cfg.get("text_encoder") is not None else None
    return autoencoder, text_encoder


def prepare_settings(cfg: DictConfig, force: bool = False):
    """The checked ``PrepareSettings`` of ``cfg.data.prepare`` (None without that section): before any work."""
    from latentup.data.prepare import PrepareSettings

    spec = cfg.data.get("prepare")
    if spec is None:
        if force:
            raise ConfigError("stage=prepare needs a data config with a prepare section (e.g. data=shards)")
        return None
    with_text = bool(spec.text) and cfg.get("text_encoder") is not None
    return PrepareSettings(**OmegaConf.to_container(spec.settings, resolve=True),
                           autoencoder=component_name(cfg.autoencoder, "spec"),
                           text_encoder=component_name(cfg.text_encoder, "weights") if with_text else None)


def prepare(cfg: DictConfig, settings, autoencoder, text_encoder, force: bool = False) -> dict | None:
    """Write (or finish) the latent-pair shards of ``settings`` (from :func:`prepare_settings`); complete shards in
    ``data.root`` are used as they are (e.g. prepared elsewhere with other settings)."""
    from latentup.data.prepare import prepare_pairs
    from latentup.data.shards import read_manifest

    if settings is None:
        return None
    spec = cfg.data.prepare
    manifest = read_manifest(cfg.data.root)
    if (manifest is not None and manifest["complete"]) or not (force or spec.auto):
        return manifest
    return prepare_pairs(settings, cfg.data.root, autoencoder, text_encoder if settings.text_encoder else None,
                         shard_size=spec.shard_size, batch_size=spec.batch_size, num_workers=spec.num_workers,
                         device=spec.device)


def build_module(cfg: DictConfig, autoencoder, text_encoder):
    from hydra.utils import instantiate

    meta = {"autoencoder": component_name(cfg.autoencoder, "spec"),
            "text_encoder": component_name(cfg.text_encoder, "weights"),
            "recommended": {"steps": cfg.model.validation.steps * 3, "sampler": "euler", "schedule": "log_linear"},
            "training": {"experiment": cfg.name}}
    return instantiate(cfg.model, _convert_="all", optimizer=instantiate(cfg.optim.optimizer, _convert_="all"),
                       scheduler=instantiate(cfg.optim.get("scheduler"), _convert_="all"),
                       autoencoder=autoencoder, text_encoder=text_encoder, meta=meta)


def build_trainer(cfg: DictConfig):
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor

    from latentup.training.callbacks import RemovePartialCheckpoints
    from latentup.training.checkpoint_io import AtomicCheckpointIO

    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None] or False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not loggers:  # logger=none: nothing to monitor the learning rate into (Lightning refuses the monitor then)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(RemovePartialCheckpoints())  # what AtomicCheckpointIO leaves when a run is killed mid-write
    return instantiate(cfg.trainer, precision=resolve_precision(cfg.trainer.precision), callbacks=callbacks,
                       logger=loggers, plugins=[AtomicCheckpointIO()])


def last_checkpoint(cfg: DictConfig) -> Path:
    """``ckpt_path`` as a file, checked to be a training checkpoint; ``last`` is ``<run_dir>/checkpoints/last.ckpt``."""
    from latentup.training.checkpoint_io import load_training_checkpoint

    if cfg.ckpt_path is None:
        raise ConfigError(f"stage={cfg.stage} needs ckpt_path=PATH (or last)")
    path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: check ckpt_path and name")
    load_training_checkpoint(path, mmap=True)  # cheap: tensors stay on disk
    return path


def export_options(cfg: DictConfig) -> tuple:
    """(dtype, recommended sampler settings) of ``cfg.export``, checked (fit checks them before training)."""
    import torch

    from latentup.training.export import check_recommended

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if cfg.export.dtype is not None and cfg.export.dtype not in dtypes:
        raise ConfigError(f"export.dtype must be float16, bfloat16, float32 or null, got {cfg.export.dtype!r}")
    recommended = cfg.export.get("recommended")
    if isinstance(recommended, DictConfig):
        recommended = OmegaConf.to_container(recommended)
    if recommended is not None:
        check_recommended(recommended)
    return dtypes.get(cfg.export.dtype), recommended


def export(cfg: DictConfig, checkpoint: Path) -> dict:
    from latentup.training.export import export_checkpoint

    dtype, recommended = export_options(cfg)
    written = export_checkpoint(checkpoint, Path(cfg.run_dir) / "export", ema=cfg.export.ema,
                                diffusers=cfg.export.diffusers, dtype=dtype, recommended=recommended)
    for kind, path in written.items():
        print(f"exported {kind}: {path}")
    return written


def fit(cfg: DictConfig) -> None:
    import lightning as L
    import torch

    settings = prepare_settings(cfg)
    export_options(cfg)
    if cfg.ckpt_path not in (None, "last"):
        last_checkpoint(cfg)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the EMA copy, on purpose
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autoencoder, text_encoder = build_helpers(cfg)
    prepare(cfg, settings, autoencoder, text_encoder)
    module = build_module(cfg, autoencoder, text_encoder)
    datamodule = hydra.utils.instantiate(cfg.data.module)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    final = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(final, weights_only=False)
    if trainer.is_global_zero:
        export(cfg, final)


def validate(cfg: DictConfig) -> None:
    import lightning as L

    checkpoint = last_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    autoencoder, text_encoder = build_helpers(cfg)
    module = build_module(cfg, autoencoder, text_encoder)
    trainer = build_trainer(cfg)
    results = trainer.validate(module, datamodule=hydra.utils.instantiate(cfg.data.module), ckpt_path=str(checkpoint))
    if trainer.is_global_zero:
        print(json.dumps(results[0] if results else {}, indent=2))


def run(cfg: DictConfig) -> None:
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a whole number >= 1 or null (PyTorch's default), got {threads!r}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if cfg.stage == "prepare":
        settings = prepare_settings(cfg, force=True)
        autoencoder, text_encoder = build_helpers(cfg)
        manifest = prepare(cfg, settings, autoencoder, text_encoder, force=True)
        print(f"{cfg.data.root}: {manifest['count']} pairs in {len(manifest['shards'])} shards "
              f"({len(manifest['skipped'])} sources too small)")
    elif cfg.stage == "fit":
        fit(cfg)
    elif cfg.stage == "validate":
        validate(cfg)
    elif cfg.stage == "export":
        export(cfg, last_checkpoint(cfg))
    else:
        raise ConfigError(f"unknown stage {cfg.stage!r}: use prepare, fit, validate or export")


@command(Path(__file__).parent / "configs", "train", __doc__, FREE_TEXT)
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        run(cfg)


if __name__ == "__main__":
    main()
