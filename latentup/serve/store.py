"""Images kept for a while: uploads and outputs, each under a new imageUUID, served back at ``/image/<name>``.

Files live in one folder (atomic writes); an index in memory maps imageUUID -> entry (file, MIME type, expiry time,
size, owner). Each image belongs to the API key (its id) that made it: only that key may use it as an input
(:meth:`ImageStore.read`); the URL itself is served to anyone holding it (:meth:`ImageStore.get`, like the hosted
CDN). The folder holds at most ``max_bytes``: the images closest to expiry make room for a new one. Files of earlier
runs left in the folder are deleted at start; expired entries by :meth:`ImageStore.purge`. Thread-safe.
"""

import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from latentup.atomic import write_atomic
from latentup.serve.tasks import TaskError

OWN_FILE = re.compile(r"^\.?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.")  # files and temp files


@dataclass(frozen=True)
class Entry:
    """A stored image: its file (``path``) or, in the shared store, its bytes (``data``)."""

    path: Path | None
    mime: str
    expires: float
    size: int
    owner: str
    name: str = ""
    data: bytes | None = None


class ImageStore:
    def __init__(self, folder, ttl: float, max_bytes: int = 2**62):
        self.folder, self.ttl, self.max_bytes = Path(folder), ttl, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.iterdir():  # an earlier run's images: their index died with it
            if leftover.is_file() and OWN_FILE.match(leftover.name):
                leftover.unlink(missing_ok=True)
        self._index: dict[str, Entry] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, suffix: str, mime: str, ttl: float | None = None, owner: str = "") -> tuple[str, str]:
        """Store ``data`` for ``ttl`` seconds (at most the store's); returns (imageUUID, file name)."""
        if len(data) > self.max_bytes:
            raise TaskError("invalidParameter", f"the image is {len(data)} bytes, over the store's cap of "
                            f"{self.max_bytes}: send a smaller one")
        with self._lock:  # make room first, so the folder never holds more than max_bytes
            evicted = []
            while self._index and self._bytes + len(data) > self.max_bytes:
                oldest = min(self._index, key=lambda key: self._index[key].expires)
                evicted.append(self._pop(oldest).path)
            self._bytes += len(data)
        for path in evicted:
            path.unlink(missing_ok=True)
        image_uuid = str(uuid.uuid4())
        path = write_atomic(self.folder / f"{image_uuid}.{suffix}", lambda tmp: Path(tmp).write_bytes(data))
        with self._lock:
            self._index[image_uuid] = Entry(path, mime, time.monotonic() + min(ttl or self.ttl, self.ttl),
                                            len(data), owner, path.name)
        return image_uuid, path.name

    def _pop(self, image_uuid: str) -> Entry:
        entry = self._index.pop(image_uuid)
        self._bytes -= entry.size
        return entry

    def get(self, image_uuid: str) -> Entry | None:
        """The entry of a live image, else None."""
        with self._lock:
            entry = self._index.get(image_uuid)
        return entry if entry is not None and entry.expires >= time.monotonic() else None

    def read(self, image_uuid: str, owner: str = "") -> bytes | None:
        """The bytes of a live image of ``owner``, else None."""
        entry = self.get(image_uuid)
        try:
            return entry.path.read_bytes() if entry is not None and entry.owner == owner else None
        except FileNotFoundError:  # purged meanwhile
            return None

    def purge(self) -> int:
        """Delete expired images; returns how many."""
        now = time.monotonic()
        with self._lock:
            paths = [self._pop(key).path for key in [k for k, e in self._index.items() if e.expires < now]]
        for path in paths:
            path.unlink(missing_ok=True)
        return len(paths)

    def stats(self) -> tuple[int, int]:
        """(images, bytes) held."""
        with self._lock:
            return len(self._index), self._bytes
