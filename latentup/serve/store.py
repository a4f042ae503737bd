"""Images kept for a while: uploads and outputs, each under a new imageUUID, served back at ``/image/<name>``.

Files live in one folder (atomic writes); an index in memory maps imageUUID -> (file, MIME type, expiry time).
Expired entries are deleted by :meth:`ImageStore.purge` (the server calls it periodically). Thread-safe.
"""

import threading
import time
import uuid
from pathlib import Path

from latentup.atomic import write_atomic


class ImageStore:
    def __init__(self, folder, ttl: float):
        self.folder, self.ttl = Path(folder), ttl
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[Path, str, float]] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes, suffix: str, mime: str, ttl: float | None = None) -> tuple[str, str]:
        """Store ``data`` for ``ttl`` seconds (at most the store's); returns (imageUUID, file name)."""
        image_uuid = str(uuid.uuid4())
        path = write_atomic(self.folder / f"{image_uuid}.{suffix}", lambda tmp: Path(tmp).write_bytes(data))
        with self._lock:
            self._index[image_uuid] = (path, mime, time.monotonic() + min(ttl or self.ttl, self.ttl))
        return image_uuid, path.name

    def get(self, image_uuid: str) -> tuple[Path, str] | None:
        """(file, MIME type) of a live image, else None."""
        with self._lock:
            entry = self._index.get(image_uuid)
        if entry is None or entry[2] < time.monotonic():
            return None
        return entry[0], entry[1]

    def read(self, image_uuid: str) -> bytes | None:
        entry = self.get(image_uuid)
        try:
            return entry[0].read_bytes() if entry else None
        except FileNotFoundError:  # purged meanwhile
            return None

    def purge(self) -> int:
        """Delete expired images; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [key for key, (_, _, until) in self._index.items() if until < now]
            paths = [self._index.pop(key)[0] for key in expired]
        for path in paths:
            path.unlink(missing_ok=True)
        return len(paths)

    def __len__(self) -> int:
        return len(self._index)
