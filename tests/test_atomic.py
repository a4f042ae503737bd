"""Atomic writes: whole files with the usual permissions, and nothing half-written when the writer fails."""

import os
import stat
from pathlib import Path

import pytest

from latentup.atomic import umask, write_atomic, write_text_atomic


def test_write_atomic_creates_folders_and_uses_umask_permissions(tmp_path):
    path = write_atomic(tmp_path / "a" / "b.txt", lambda tmp: Path(tmp).write_text("hello"))
    assert path.read_text() == "hello"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask()  # not mkstemp's 0600
    assert os.listdir(path.parent) == ["b.txt"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = write_atomic(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("old"))

    def broken(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomic(path, broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["b.txt"]


def test_write_text_atomic_replaces_the_whole_text(tmp_path):
    path = write_text_atomic(tmp_path / "r.md", "a much longer first version\n")
    write_text_atomic(path, "ü\n")
    assert path.read_bytes() == "ü\n".encode() and os.listdir(tmp_path) == ["r.md"]
