"""Where the YAML configs are: the package data ``latentup.configs`` of an installed wheel (``pyproject.toml`` maps
the top-level ``configs/`` folder there), else the checkout's ``configs/``."""

from importlib import resources
from pathlib import Path


def config_dir(group: str = "") -> Path:
    """The folder of config group ``group`` (``""``: the root), e.g. ``config_dir("degradation")``."""
    try:
        root = Path(str(resources.files("latentup.configs")))
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[1] / "configs"
    return root / group if group else root
