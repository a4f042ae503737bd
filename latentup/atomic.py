"""Atomic file writes: write a temporary file in the target's folder, fsync it, then rename it over the target.

A process killed mid-write leaves the previous file (or none), never half a file, plus at worst a hidden temporary
``.<stem>.<8 random characters><suffix>`` (:func:`stale_temporaries` finds them). The result gets the usual
permissions, 0666 & ~umask (mkstemp alone would leave 0600). Writers that must not replace a file publish with a
hard link, which fails when the name exists, so two processes never both believe they wrote it.
"""

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from latentup.errors import InputError


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the finished file to ``path`` (parent folders are created). With
    ``overwrite=False`` an existing ``path`` (also one that appeared during the write) is left alone: InputError."""
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
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path, text: str) -> Path:
    """:func:`write_atomic` for a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _publish_new(tmp: str, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path`` unless that name exists (atomically where hard links work)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise InputError(f"{path} exists (another run wrote it meanwhile?): it was left as it is; choose another "
                         "output or remove it") from None
    except OSError as error:  # a file system without hard links: check, then rename
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(path):
            raise InputError(f"{path} exists: it was left as it is; choose another output or remove it") from None
        os.replace(tmp, path)


def stale_temporaries(folder, suffix: str) -> list[Path]:
    """Temporary files of :func:`write_atomic` with ``suffix`` left in ``folder`` by a killed writer."""
    pattern = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(suffix))
    folder = Path(folder)
    return sorted(p for p in folder.glob(f".*{suffix}") if pattern.fullmatch(p.name)) if folder.is_dir() else []


@contextmanager
def folder_lock(folder) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing; removed again if it is still empty at the end)
    while writing into it: an InputError when another process holds it. The lock dies with the process."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): the per-file checks of write_atomic still hold
            pass
        except BlockingIOError:
            raise InputError(f"output folder {folder} is being written by another run: wait for it to finish or "
                             "choose another output") from None
        yield folder
    finally:
        os.close(fd)
        if created and not any(folder.iterdir()):
            folder.rmdir()
