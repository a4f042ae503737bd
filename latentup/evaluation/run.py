"""The evaluation loop: sets -> batches of equal-size images -> rows -> per-image metrics -> CSV, grids, tables.

Image i of a set (sorted by name) samples the model rows with seed ``seed + i``, whatever the batching, so a
run is deterministic and a resumed run adds exactly what an uninterrupted one would have. Resuming: records
already in ``per_image.csv`` (and grids already written) are skipped; ``settings.json`` guards against mixing
results of different settings in one output folder.

FID / KID (optional): the pool3 features of every row's outputs and of the HR crops are cached per image in
``features/<set>/<image>.safetensors`` (8 KB per row), written with the image's records, and the set distances
are computed from the cache at the end. Outputs are not kept (a float32 image takes hundreds of times more), so
the cache is what makes a resumed run give the distances of an uninterrupted one; a missing feature marks its
row missing, like a missing record.
"""

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from latentup.atomic import write_text_atomic
from latentup.data.degradation import Degradation
from latentup.autoencoders import Autoencoder, load_autoencoder
from latentup.devices import resolve_device
from latentup.errors import ConfigError, InputError, WeightsNotFoundError
from latentup.evaluation.grids import save_grid
from latentup.evaluation.inception import FIDInceptionV3, load_fid_inception, set_distances
from latentup.evaluation.metrics import ImageMetrics
from latentup.evaluation.protocol import (BASELINES, PictureRow, check_align, hr_size, list_set_images, load_pair,
                                          reconstruct)
from latentup.evaluation.report import (add_features, append_records, read_features, read_records, summarize,
                                        write_summary)
from latentup.seeds import image_seed, mix_seed
from latentup.settings import check_int

# A model row: ``upscale(lr_latent, seed=[seed per sample]) -> image`` (SD-scaled latent in, [0, 1] image out), or
# a PictureRow (the LR picture in).
ModelRow = Callable[..., torch.Tensor]
CSV_NAME, SETTINGS_NAME = "per_image.csv", "settings.json"


def protocol_line(align: int, border: int, autoencoder: str, lpips: bool, fid: bool = False,
                  wear: str | None = None) -> str:
    worn = f", then worn ({wear}; seeded per image; every row scored against the clean HR)" if wear else ""
    return (f"HR: centre crop to multiples of {align} px; LR: PIL bicubic x0.5{worn}; autoencoder: {autoencoder}; "
            f"outputs float32, not quantised. PSNR/SSIM in float64 on 0..255 with a {border}-px border crop "
            "(Y = BT.601 16 + 65.481 R + 128.553 G + 24.966 B); SSIM Gaussian 11x11, sigma 1.5; "
            + ("LPIPS v0.1 AlexNet on the full image, [-1, 1]. " if lpips else "LPIPS off. ")
            + "Means over images, equal weight."
            + (" FID / KID: each row's outputs against the set's HR crops, 2048-d pool3 features of the FID "
               "Inception-v3 (pytorch-fid weights, 299 px bilinear); KID subsets of min(1000, N) images. FID is "
               "biased upward on fewer than ~2,000 images: compare rows of one table, not published FIDs."
               if fid else ""))


def feature_file(folder: Path, name: str, image: str) -> Path:
    return folder / "features" / name / f"{image}.safetensors"


@torch.no_grad()
def cache_features(inception: FIDInceptionV3, images: Mapping[str, torch.Tensor], files: Sequence[Path],
                   cached: Sequence[set[str]]) -> None:
    """Add to each image's feature file the features of the rows of ``images`` ({row: [B, 3, H, W]}) it lacks;
    ``cached`` (the rows each file holds) is updated."""
    features = {row: inception(x) for row, x in images.items() if any(row not in have for have in cached)}
    for j, (file, have) in enumerate(zip(files, cached)):
        new = {row: f[j] for row, f in features.items() if row not in have}
        if new:
            add_features(file, new)
            have |= new.keys()


def check_settings(folder: Path, settings: dict) -> None:
    """Write ``settings.json``, or refuse a folder whose earlier results used other settings. Checkpoints may
    be added to a folder, but a row name must keep its checkpoint path."""
    path = folder / SETTINGS_NAME
    before = json.loads(path.read_text()) if path.is_file() else dict(settings)
    old, new = before.get("checkpoints", {}), settings.get("checkpoints", {})
    changed = sorted(k for k in (settings.keys() | before.keys()) - {"checkpoints"} if settings.get(k) != before.get(k))
    changed += [f"checkpoint {k}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
    if changed:
        raise ConfigError(f"{folder} holds results of other settings ({', '.join(changed)}): "
                          "use another output_dir or delete that one")
    write_text_atomic(path, json.dumps({**settings, "checkpoints": {**old, **new}}, indent=2, sort_keys=True) + "\n")


def check_loop(align: int, batch_size: int, grids: int, downscale: int = 8, *, border: int = 2,
               grid_tile: int = 256, limit: int | None = None, seed: int = 0) -> None:
    """The loop's integers, in range (``limit`` None: every image)."""
    for name, value, low in (("align", align, None), ("batch_size", batch_size, 1), ("grids", grids, 0),
                             ("border", border, 0), ("grid_tile", grid_tile, 1), ("seed", seed, None)):
        check_int(name, value, low)
    check_int("limit", limit, 1, hint="null = every image", optional=True)
    check_align(align, downscale)
    if 4 * border >= align:
        raise ConfigError(f"border={border} must be under align / 4 = {align / 4:g} px: lower border")


def check_output_dir(folder: Path) -> None:
    """``folder`` must be a folder, or creatable as one: no file in its place or on its path."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"output_dir={folder}: {existing} is a file, not a folder: pass another output_dir")


def _batches(files: Sequence[Path], align: int, batch_size: int) -> list[list[int]]:
    """Indices of ``files`` grouped by HR size (first-seen order), then cut into batches. Decodes every image, so
    an unreadable one fails here."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, file in enumerate(files):
        groups.setdefault(hr_size(file, align), []).append(i)
    return [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def evaluate(
    autoencoder: Autoencoder,
    sets: Mapping[str, Path],
    output_dir: str | Path,
    metrics: ImageMetrics,
    models: Mapping[str, ModelRow] | None = None,
    *,
    align: int = 64,
    batch_size: int = 4,
    seed: int = 0,
    grids: int = 3,
    grid_tile: int = 256,
    limit: int | None = None,
    progress: bool = True,
    settings: dict | None = None,
    autoencoder_name: str = "autoencoder",
    inception: FIDInceptionV3 | None = None,
    degradation: Degradation | None = None,
) -> dict:
    """Evaluate every row on every image of ``sets`` ({name: folder}); returns the summary (set means, and each
    row's FID / KID against the HR crops when ``inception`` is given). With ``degradation`` the LR of image i is
    worn (seeded by ``mix_seed(seed, i)``) before every row sees it, and the rows are scored against the clean HR.

    Writes ``per_image.csv``, ``results.md``, ``summary.json`` and ``grids/<set>/<image>.png`` (first ``grids``
    images of each set) under ``output_dir``, and ``features/<set>/<image>.safetensors`` with ``inception``.
    """
    models = dict(models or {})
    check_loop(align, batch_size, grids, autoencoder.downscale, border=metrics.border, grid_tile=grid_tile,
               limit=limit, seed=seed)
    folder = Path(output_dir)
    check_output_dir(folder)
    files = {name: list_set_images(folder)[:limit] for name, folder in sets.items()}
    batches = {name: _batches(paths, align, batch_size) for name, paths in files.items()}  # before anything is written
    check_settings(folder, {**(settings or {}), "align": align, "border": metrics.border, "seed": seed})
    rows = [*models, *BASELINES]
    grid_rows = [*BASELINES[1:], *models, BASELINES[0]]  # LR | baselines | model(s) | ceiling | HR
    csv_path = folder / CSV_NAME
    done = {(r["set"], r["image"], r["row"]) for r in read_records(csv_path)}
    torch.manual_seed(seed)
    device = next(autoencoder.parameters()).device
    metrics.to(device)
    if inception is not None:
        inception.to(device)
    for name, paths in files.items():
        grid_path = {i: folder / "grids" / name / f"{paths[i].stem}.png" for i in range(min(grids, len(paths)))}
        features = [feature_file(folder, name, p.name) for p in paths] if inception is not None else []
        cached = [set(read_features(file)) for file in features]
        missing = {(i, row) for i, path in enumerate(paths) for row in rows
                   if (name, path.name, row) not in done or (i in grid_path and not grid_path[i].is_file())
                   or (cached and row not in cached[i])}
        pending = [[i for i in batch if any((i, row) in missing for row in rows)]
                   for batch in batches[name]]
        bar = tqdm(total=sum(map(len, pending)), desc=name, unit="img", disable=not progress)
        for batch in filter(None, pending):
            pairs = [load_pair(paths[i], align) for i in batch]
            if degradation is not None:
                pairs = [(hr, degradation.tensor(lr, mix_seed(seed, i))) for (hr, lr), i in zip(pairs, batch)]
            hr, lr = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            seeds = [image_seed(seed, i) for i in batch]
            run = {row: up for row, up in models.items() if any((i, row) in missing for i in batch)}
            outputs = reconstruct(autoencoder, hr, lr, run, seed=seeds)
            hr = hr.to(device)
            records = []
            for row, output in outputs.items():
                values = metrics(output, hr)
                for j, i in enumerate(batch):
                    if (name, paths[i].name, row) not in done:
                        records.append({"set": name, "image": paths[i].name, "row": row, "width": hr.shape[-1],
                                        "height": hr.shape[-2], **{k: float(v[j]) for k, v in values.items()}})
            append_records(csv_path, records)
            done |= {(r["set"], r["image"], r["row"]) for r in records}
            if inception is not None:
                cache_features(inception, {**outputs, "HR": hr}, [features[i] for i in batch],
                               [cached[i] for i in batch])
            for j, i in enumerate(batch):
                if i in grid_path and len(run) == len(models):  # a missing grid marks every row missing
                    save_grid(grid_path[i], lr[j], {row: outputs[row][j] for row in grid_rows}, hr[j], grid_tile)
            bar.update(len(batch))
        bar.close()
    images = {name: {p.name for p in paths} for name, paths in files.items()}
    records = [r for r in read_records(csv_path) if r["image"] in images.get(r["set"], ())]
    summary = summarize(records, list(files), rows)
    if inception is not None:
        for name, paths in files.items():
            stored = [read_features(feature_file(folder, name, p.name)) for p in paths]
            for row, values in summary[name]["rows"].items():
                values.update(set_distances(torch.stack([s["HR"] for s in stored]),
                                            torch.stack([s[row] for s in stored]), seed))
    protocol = protocol_line(align, metrics.border, autoencoder_name, metrics.lpips is not None, inception is not None,
                             degradation.describe() if degradation is not None else None)
    write_summary(folder, summary, {**(settings or {}), "align": align, "seed": seed, "sets": list(files)}, protocol)
    return summary


def load_models(checkpoints: Sequence[str | Path], autoencoder: Autoencoder, *, device="cpu", dtype="float32",
                pictures: bool = False, **settings) -> dict[str, ModelRow]:
    """One model row per checkpoint (row name: the file stem or folder name), sampling with ``settings``
    (steps, sampler, cfg_scale, prompt, colour_fix, back_projection; None = the weights' recommendation), and with
    ``pictures`` its picture-path row ("<name> picture": the LR picture through ``upscale_pixels``, as infer.py runs
    it). Each Upscaler gets its own copy of ``autoencoder`` to decode its rows in the model's dtype; the baselines'
    copy stays float32."""
    from latentup.pipeline import Upscaler

    models: dict[str, ModelRow] = {}
    for checkpoint in checkpoints:
        path = Path(checkpoint).expanduser()
        base = path.name if path.is_dir() else path.stem
        name, k = base, 1
        while name in models:
            name, k = f"{base}-{k}", k + 1
        upscaler = Upscaler.from_pretrained(path, device=device, dtype=dtype, autoencoder=copy.deepcopy(autoencoder))
        models[name] = partial(upscaler.upscale_latent_to_image, **settings)
        if pictures:
            models[f"{name} picture"] = PictureRow(partial(upscaler.upscale_pixels, **settings))
    return models


def _autoencoder_spec(node) -> str:
    return str(node.get("spec", node.get("_target_"))) if hasattr(node, "get") else str(node)


def _autoencoder_arguments(node) -> dict:
    """:func:`load_autoencoder`'s arguments from a config node (configs/autoencoder/: spec, download, ...) or a
    spec."""
    if not hasattr(node, "items"):
        return {"spec": str(node)}
    return {k: v for k, v in node.items() if k != "_target_"}


def from_config(cfg) -> dict:
    """Run :func:`evaluate` from a config laid out like ``configs/evaluate.yaml``; inputs (settings, images, output
    folder) are checked before any weights load."""
    from latentup.settings import Settings, resolve_dtype

    device = resolve_device(cfg.device)
    resolve_dtype(cfg.dtype, device)
    check_loop(cfg.align, cfg.batch_size, cfg.grids, border=cfg.border, grid_tile=cfg.grid_tile, limit=cfg.limit,
               seed=cfg.seed)
    from omegaconf import OmegaConf

    sampling = {"steps": cfg.steps, "sampler": cfg.sampler, "cfg_scale": cfg.cfg_scale, "prompt": cfg.prompt,
                "colour_fix": cfg.colour_fix, "back_projection": cfg.back_projection, "restore": cfg.restore}
    wear_config = cfg.get("degradation")
    wear_config = None if wear_config is None else OmegaConf.to_container(wear_config, resolve=True)
    degradation = Degradation.from_config(wear_config)
    Settings(**{k: v for k, v in {**sampling, "seed": cfg.seed}.items() if v is not None}).validate()
    names = [cfg.sets] if isinstance(cfg.sets, str) else list(cfg.sets or [])
    if not names:
        raise ConfigError("sets is empty: name at least one set folder under data_root, e.g. sets=[Set5]")
    sets = {str(name): Path(cfg.data_root).expanduser() / str(name) for name in names}
    for folder in sets.values():
        for path in list_set_images(folder)[: cfg.limit]:
            hr_size(path, cfg.align)  # a corrupt or too small image fails here
    check_output_dir(Path(cfg.output_dir))
    checkpoints = [cfg.checkpoints] if isinstance(cfg.checkpoints, str) else list(cfg.checkpoints or [])
    for checkpoint in checkpoints:
        if not Path(checkpoint).expanduser().exists():
            raise WeightsNotFoundError(f"checkpoint {checkpoint} does not exist: check the checkpoints list")
    metrics = ImageMetrics(border=cfg.border, lpips=cfg.lpips, lpips_backbone=cfg.lpips_backbone)
    inception = load_fid_inception(str(cfg.fid)) if cfg.fid else None
    spec = _autoencoder_spec(cfg.autoencoder)
    autoencoder = load_autoencoder(**_autoencoder_arguments(cfg.autoencoder))
    autoencoder = autoencoder.to(device, torch.float32).eval()
    models = load_models(checkpoints, autoencoder, device=device, dtype=cfg.dtype, pictures=cfg.picture_rows,
                         **sampling)
    settings = {"autoencoder": spec, "lpips": bool(cfg.lpips), "fid": str(cfg.fid) if cfg.fid else None,
                "dtype": str(cfg.dtype), **sampling, **({"degradation": wear_config} if degradation else {}),
                "checkpoints": {name: str(p) for name, p in zip(
                    [name for name, row in models.items() if not isinstance(row, PictureRow)], checkpoints)}}
    return evaluate(autoencoder, sets, cfg.output_dir, metrics, models, align=cfg.align, batch_size=cfg.batch_size,
                    seed=cfg.seed, grids=cfg.grids, grid_tile=cfg.grid_tile, limit=cfg.limit, progress=cfg.progress,
                    settings=settings, autoencoder_name=spec, inception=inception, degradation=degradation)
