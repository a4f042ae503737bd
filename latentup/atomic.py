"""Atomic file writes: write a temporary file in the target's folder, fsync it, then rename it over the target.

A process killed mid-write leaves the previous file (or none), never half a file. The result gets the usual
permissions, 0666 & ~umask (mkstemp alone would leave 0600).
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the finished file to ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path, text: str) -> Path:
    """:func:`write_atomic` for a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
