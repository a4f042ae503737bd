"""Where training images come from: an image folder (recursive; captions from ``.txt`` sidecars) or WebDataset
tar shards (samples grouped by key: ``key.jpg`` + ``key.txt``). Both are map-style over a fixed, sorted list, so
that preparation can resume at any source index.
"""

import glob
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from latentup.errors import InputError
from latentup.imageio import IMAGE_SUFFIXES, list_images


@dataclass
class Source:
    key: str  # a stable name (relative path or tar:key)
    image: Image.Image  # RGB
    caption: str


def _rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


class ImageFolder:
    """Every image under ``root`` (recursively, sorted by relative path); caption = ``<stem>.txt`` or ""."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise InputError(f"image folder {self.root} does not exist: check data.prepare.settings.source "
                             "(data=shards) or data.module.train.root (data=images), or $LATENTUP_DATA")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise InputError(f"image folder {self.root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> Source:
        path = self.files[index]
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        try:
            with Image.open(path) as image:
                return Source(self.key(index), _rgb(image), caption)
        except OSError as error:
            raise InputError(f"{path} is not a readable image ({type(error).__name__}): remove or fix it") from None


class TarShards:
    """WebDataset tar files (a glob or a list); one sample per key that has an image member."""

    def __init__(self, shards: str | list[str]):
        files = sorted(glob.glob(str(Path(shards).expanduser()))) if isinstance(shards, str) else list(shards)
        if not files:
            raise InputError(f"no tar shards match {shards}: check the pattern")
        self.samples: list[tuple[str, str, str | None]] = []  # (tar file, image member, caption member)
        for file in files:
            with tarfile.open(file) as tar:
                members: dict[str, dict[str, str]] = {}
                for m in tar.getmembers():
                    if m.isfile():
                        folder, _, base = m.name.rpartition("/")
                        stem, _, ext = base.partition(".")
                        key = f"{folder}/{stem}" if folder else stem
                        members.setdefault(key, {})[ext.lower()] = m.name
            for key in sorted(members):
                image = next((members[key][e] for e in members[key] if "." + e in IMAGE_SUFFIXES), None)
                if image is not None:
                    self.samples.append((file, image, members[key].get("txt")))
        self._open: dict[str, tarfile.TarFile] = {}  # per process (DataLoader workers reopen)

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        file, image, _ = self.samples[index]
        return f"{Path(file).name}:{image}"

    def _read(self, file: str, member: str) -> bytes:
        if file not in self._open:
            self._open[file] = tarfile.open(file)  # noqa: SIM115 - kept open for the worker's lifetime
        return self._open[file].extractfile(member).read()

    def __getitem__(self, index: int) -> Source:
        file, image, caption = self.samples[index]
        text = self._read(file, caption).decode("utf-8").strip() if caption else ""
        return Source(self.key(index), _rgb(Image.open(io.BytesIO(self._read(file, image)))), text)

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}


def list_set_images(folder: str | Path) -> list[Path]:
    """Image files of an evaluation set folder, sorted by name (other files such as SOURCE.txt are skipped)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"eval set folder {folder} does not exist: check data_root and sets")
    return list_images(folder)


def open_source(path: str | Path) -> ImageFolder | TarShards:
    """A folder -> ImageFolder; a ``.tar`` file or a glob of them -> TarShards."""
    text = str(path)
    if text.endswith(".tar") or any(c in text for c in "*?["):
        return TarShards(text)
    return ImageFolder(text)
