"""Evaluation outputs: the per-image CSV (append-only, the resume state), set means, a Markdown table and JSON.

One CSV record per (set, image, row): ``set, image, row, width, height`` and the metric values.
Set means give every image equal weight. Set-level metrics (FID, KID) are not per image: they live in the
summary only, computed from one feature file per image, ``{row: [2048] pool3 features, "HR": ...}``.
"""

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from latentup.atomic import write_atomic, write_text_atomic
from latentup.evaluation.metrics import METRICS

KEYS = ("set", "image", "row", "width", "height")
FIELDS = (*KEYS, *METRICS)
SET_METRICS = ("fid", "kid")
HEADINGS = {"psnr_y": "PSNR-Y (dB)", "psnr_rgb": "PSNR-RGB (dB)", "ssim_y": "SSIM-Y", "ssim_rgb": "SSIM-RGB",
            "lpips": "LPIPS-alex", "fid": "FID", "kid": "KID ×10³"}
DIGITS = {"psnr_y": 2, "psnr_rgb": 2, "ssim_y": 4, "ssim_rgb": 4, "lpips": 4, "fid": 2, "kid": 2}
SCALE = {"kid": 1e3}


def read_records(path: str | Path) -> list[dict]:
    """Records of a per-image CSV (metric values as floats); a missing file is empty. Only whole, consistent rows
    count: ended by a line break (a row cut by a kill is not), one value per header field, set / image / row
    named, positive integer sizes, numeric metrics. Anything else is left out, so its image is computed again."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    text = data[: _complete_length(data)].decode("utf-8", errors="replace")
    records = []
    for raw in csv.DictReader(io.StringIO(text, newline="")):
        if None in raw or None in raw.values() or any(raw.get(k) in (None, "") for k in KEYS):
            continue
        try:
            metrics = {k: float(raw[k]) for k in METRICS if raw.get(k) not in (None, "")}
            record = {**{k: raw[k] for k in KEYS[:3]}, "width": int(raw["width"]), "height": int(raw["height"])}
        except ValueError:
            continue
        if record["width"] > 0 and record["height"] > 0 and metrics:
            records.append({**record, **metrics})
    return records


def _complete_length(data: bytes) -> int:
    """Length of ``data`` up to its last line break (what a writer killed mid-row left complete)."""
    return max(data.rfind(b"\n"), data.rfind(b"\r")) + 1


def append_records(path: str | Path, records: Iterable[dict]) -> None:
    """Append records (writing the header first for a new file) and flush, so a crash loses at most one batch. A row
    cut by an earlier crash is removed first, so that the new rows start on a line of their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        with path.open("r+b") as handle:
            handle.truncate(_complete_length(handle.read()))
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(records)


def read_features(path: str | Path) -> dict[str, Tensor]:
    """One image's cached features ``{row: [2048]}``; a missing or unreadable file holds none."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError):
        return {}


def add_features(path: str | Path, features: Mapping[str, Tensor]) -> None:
    """Merge ``features`` into an image's feature file, atomically (a temporary file renamed over it)."""
    merged = {**read_features(path), **{k: v.detach().float().cpu().contiguous() for k, v in features.items()}}
    write_atomic(path, lambda tmp: save_file(merged, tmp))


def summarize(records: Iterable[dict], sets: Sequence[str], rows: Sequence[str]) -> dict:
    """``{set: {"images": n, "rows": {row: {metric: mean}}}}``, rows in the given order (the last record of a
    repeated (set, image, row) wins)."""
    latest = {(r["set"], r["image"], r["row"]): r for r in records}
    out = {}
    for name in sets:
        table, images = {}, set()
        for row in rows:
            chosen = [r for (s, _, w), r in latest.items() if s == name and w == row]
            images |= {r["image"] for r in chosen}
            means = {m: math.fsum(r[m] for r in chosen) / len(chosen) for m in METRICS
                     if chosen and all(m in r for r in chosen)}
            if means:
                table[row] = means
        out[name] = {"images": len(images), "rows": table}
    return out


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def markdown_table(summary: dict, protocol: str = "") -> str:
    """One Markdown table per set (rows side by side), preceded by the protocol line."""
    lines = [protocol, ""] if protocol else []
    for name, data in summary.items():
        metrics = [m for m in (*METRICS, *SET_METRICS) if any(m in v for v in data["rows"].values())]
        lines += [f"### {name} ({data['images']} images)", "",
                  "| row | " + " | ".join(HEADINGS[m] for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for row, values in data["rows"].items():
            cells = [_fmt(values[m] * SCALE.get(m, 1), DIGITS[m]) if m in values else "–" for m in metrics]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _finite(value):
    """JSON has no inf/nan: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(folder: str | Path, summary: dict, settings: dict, protocol: str) -> tuple[Path, Path]:
    """``results.md`` (the tables) and ``summary.json`` (settings + means) in ``folder``."""
    folder = Path(folder)
    md, js = folder / "results.md", folder / "summary.json"
    write_text_atomic(md, markdown_table(summary, protocol))
    write_text_atomic(js, json.dumps(_finite({"settings": settings, "protocol": protocol, "sets": summary}), indent=2,
                                     allow_nan=False) + "\n")
    return md, js
