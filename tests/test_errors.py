"""Entry points turn a LatentupError into one line on stderr and exit status 2; other errors pass through."""

import subprocess
import sys

import pytest

from conftest import REPO
from latentup.errors import ConfigError, exit_on_error


def exits_with(error, capsys) -> str:
    """What exit_on_error prints for ``error`` (asserting status 2)."""
    with pytest.raises(SystemExit) as exited, exit_on_error():
        raise error
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_exit_on_error_prints_one_line_and_exits_2(capsys):
    error = ConfigError("steps must be >= 1, got 0: pass steps=1 or more")
    assert exits_with(error, capsys) == "error: steps must be >= 1, got 0: pass steps=1 or more\n"


def test_a_wrapped_latentup_error_is_unwrapped(capsys):
    try:  # what Hydra's instantiate does with an error of the function it calls
        raise RuntimeError("Error in call to target 'load_autoencoder'") from ConfigError("no autoencoder given")
    except RuntimeError as wrapped:
        assert exits_with(wrapped, capsys) == "error: no autoencoder given\n"


def test_a_file_system_error_names_the_path(capsys, tmp_path):
    error = OSError(30, "Read-only file system", str(tmp_path / "o.png"))
    message = exits_with(error, capsys)
    assert message == f"error: {tmp_path / 'o.png'}: Read-only file system: check the path and its permissions\n"


def test_exit_on_error_leaves_other_errors_alone():
    with pytest.raises(ZeroDivisionError), exit_on_error():
        1 / 0
    with pytest.raises(OSError), exit_on_error():  # no file named: not the user's path
        raise OSError("device busy")


@pytest.mark.parametrize("script", ["sampler_sweep.py", "colour_shift.py"])
def test_benchmark_bad_setting_is_one_line(script, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--checkpoint", "none.safetensors",
                           "--settings", "euler:zero"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "euler:zero" in lines[0], done.stderr
