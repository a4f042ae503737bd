"""Evaluate checkpoints against the autoencoder ceiling and interpolation baselines on image folders.

    python evaluate.py                                             # ceiling + baselines on Set5, Set14, B100
    python evaluate.py checkpoints=[model.safetensors] steps=20 sets=[Set5] output_dir=outputs/eval-set5
    python evaluate.py autoencoder=sd_vae autoencoder.spec=path/to/vae lpips=false

Writes results.md, summary.json, per_image.csv and grids/ under output_dir and prints the tables.
"""

from pathlib import Path

from omegaconf import DictConfig

from latentup.cli import command
from latentup.errors import exit_on_error

FREE_TEXT = ("prompt", "output_dir", "data_root", "lpips_backbone", "fid")


@command(Path(__file__).parent / "configs", "evaluate", __doc__, FREE_TEXT)
def main(cfg: DictConfig) -> None:
    from latentup.evaluation.run import from_config

    with exit_on_error():
        from_config(cfg)
    print((Path(cfg.output_dir) / "results.md").read_text())


if __name__ == "__main__":
    main()
