"""Where the YAML configs are: ``latentup/configs/`` inside an installed wheel (``pyproject.toml`` maps the
top-level ``configs/`` folder there as package data), else the checkout's ``configs/`` beside ``latentup/``."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def config_dir(group: str = "") -> Path:
    """The folder of config group ``group`` (``""``: the root), e.g. ``config_dir("degradation")``."""
    installed = PACKAGE / "configs"
    root = installed if installed.is_dir() else PACKAGE.parent / "configs"
    return root / group if group else root
