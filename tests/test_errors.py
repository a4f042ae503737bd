"""Entry points turn a LatentupError into one line on stderr and exit status 2; other errors pass through."""

import subprocess
import sys

import pytest

from conftest import REPO
from latentup.errors import ConfigError, exit_on_error


def test_exit_on_error_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exited, exit_on_error():
        raise ConfigError("steps must be >= 1, got 0: pass steps=1 or more")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: steps must be >= 1, got 0: pass steps=1 or more\n"


def test_exit_on_error_leaves_other_errors_alone():
    with pytest.raises(ZeroDivisionError), exit_on_error():
        1 / 0


@pytest.mark.parametrize("script", ["sampler_sweep.py", "colour_shift.py"])
def test_benchmark_bad_setting_is_one_line(script, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--checkpoint", "none.safetensors",
                           "--settings", "euler:zero"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "euler:zero" in lines[0], done.stderr
