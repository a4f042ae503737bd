"""Latent-pair shards: safetensors files plus ``manifest.json``, written atomically and resumably.

A shard ``shard-NNNNNN.safetensors`` holds N aligned samples, stored in fp16 (the mask as bool, pixels as uint8):

    hr [N, C, H, W]   lr [N, C, H/2, W/2]  (SD-scaled latents);  optional: context [N, T, D]  pooled [N, D]  mask [N, T]
    hr_pixels [N, 3, 8H, 8W] (uint8, the HR crop)

The metadata lists each sample's source key and caption. ``empty_prompt.safetensors`` holds the text embedding
of "" (for caption dropout) when text was encoded.
``manifest.json`` records the settings, the shards in order and, for each, ``sources_end``: how many source
images were fully consumed when it was written. Preparation resumes after the last shard the manifest lists.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentup.atomic import write_atomic, write_text_atomic
from latentup.errors import ConfigError, InputError

FORMAT = "latentup.pairs/1"
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
FIELDS = ("hr", "lr", "context", "pooled", "mask", "hr_pixels")


def _store(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return (t.half() if t.is_floating_point() else t).contiguous()


def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


class ShardWriter:
    """Buffers samples and writes a shard every ``shard_size`` samples, at a source-image boundary.

    ``settings`` (JSON-able) must equal those of an existing manifest in ``root``; ``sources_done`` then tells
    where to resume.
    """

    def __init__(self, root: str | Path, settings: dict, shard_size: int = 1024):
        self.root = Path(root).expanduser()  # created by the first write
        self.shard_size = shard_size
        old = read_manifest(self.root)
        if old is not None and old.get("settings") != settings:
            changed = sorted(k for k in settings.keys() | old.get("settings", {}).keys()
                             if settings.get(k) != old.get("settings", {}).get(k))
            raise ConfigError(f"{self.root} holds shards made with other settings ({', '.join(changed)}): "
                              "use another output folder or the same settings")
        self.manifest = old or {"format": FORMAT, "settings": settings, "shards": [], "count": 0,
                                "sources_done": 0, "skipped": [], "complete": False}
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.skipped: list[str] = []

    @property
    def sources_done(self) -> int:
        return self.manifest["sources_done"]

    def add(self, key: str, caption: str = "", **tensors: torch.Tensor) -> None:
        """One sample (unbatched tensors named as in ``FIELDS``) cut from source ``key``."""
        for name, value in tensors.items():
            self.buffer.setdefault(name, []).append(_store(value))
        self.keys.append(key)
        self.captions.append(caption)

    def skip(self, key: str) -> None:
        """Record a source that gave no sample (too small)."""
        self.skipped.append(key)

    def end_source(self, sources_end: int) -> None:
        """Call after each source image; writes a shard when enough samples are buffered."""
        if len(self.keys) >= self.shard_size:
            self.flush(sources_end)

    def flush(self, sources_end: int, complete: bool = False) -> None:
        """Write the buffered samples as one shard (if any), then the manifest."""
        m = self.manifest
        if self.keys:
            name = f"shard-{len(m['shards']):06d}.safetensors"
            tensors = {k: torch.stack(v) for k, v in self.buffer.items()}
            metadata = {"keys": json.dumps(self.keys), "captions": json.dumps(self.captions)}
            write_atomic(self.root / name, lambda tmp: save_file(tensors, tmp, metadata=metadata))
            m["shards"].append({"file": name, "count": len(self.keys), "sources_end": sources_end})
            m["count"] += len(self.keys)
        m["sources_done"] = sources_end
        m["skipped"] += self.skipped
        m["complete"] = complete
        write_text_atomic(self.root / MANIFEST, json.dumps(m, indent=1))
        self.buffer, self.keys, self.captions, self.skipped = {}, [], [], []

    def write_empty_prompt(self, context: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor) -> None:
        tensors = {"context": _store(context), "pooled": _store(pooled), "mask": _store(mask)}
        write_atomic(self.root / EMPTY_PROMPT, lambda tmp: save_file(tensors, tmp))


class LatentShardDataset(torch.utils.data.Dataset):
    """Random access to every sample of a shard folder, read lazily from the memory-mapped files (float32 out)."""

    def __init__(self, root: str | Path, require_complete: bool = True):
        self.root = Path(root).expanduser()
        manifest = read_manifest(self.root)
        if manifest is None or manifest.get("format") != FORMAT:
            raise InputError(f"{self.root} has no latent-pair manifest: run `python train.py stage=prepare` first")
        if require_complete and not manifest["complete"]:
            raise InputError(f"{self.root} is only partly prepared ({manifest['count']} samples): finish "
                             "`python train.py stage=prepare` (it resumes) or pass require_complete=false")
        if manifest["count"] == 0:
            raise InputError(f"{self.root} holds no samples (no source was as large as the crop): delete it and "
                             "prepare again with a smaller data.prepare.settings.crop")
        self.manifest = manifest
        self.files = [self.root / s["file"] for s in manifest["shards"]]
        self.ends = torch.tensor([s["count"] for s in manifest["shards"]]).cumsum(0)
        self._handles: dict[int, object] = {}

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def __len__(self) -> int:
        return int(self.ends[-1])

    def _handle(self, shard: int):
        """(open file, its tensor names, its captions), opened once per process."""
        if shard not in self._handles:
            f = safe_open(str(self.files[shard]), "pt")
            self._handles[shard] = (f, set(f.keys()), json.loads((f.metadata() or {}).get("captions", "[]")))
        return self._handles[shard]

    def sample(self, index: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Sample ``index`` (``seed`` unused: shards are already cropped)."""
        return self[index]

    def __getitem__(self, index: int) -> dict:
        shard = int(torch.searchsorted(self.ends, index, right=True))
        offset = index - (int(self.ends[shard - 1]) if shard else 0)
        f, names, captions = self._handle(shard)
        out: dict = {"caption": captions[offset] if captions else ""}
        for name in FIELDS:
            if name in names:
                value = f.get_slice(name)[offset : offset + 1][0]
                out[name] = value.float() if value.is_floating_point() else value
        return out

    def empty_prompt(self) -> dict[str, torch.Tensor] | None:
        """The stored embedding of "" (context [1, T, D], pooled [1, D], mask [1, T]), or None."""
        path = self.root / EMPTY_PROMPT
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            names = f.keys()
            return {k: f.get_tensor(k).float() if k != "mask" else f.get_tensor(k) for k in names}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}
