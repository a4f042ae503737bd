"""infer.py's config: ``autoencoder=`` and ``text_encoder=`` are plain keys, not the config groups of configs/."""

from hydra import compose, initialize_config_dir

from conftest import REPO


def test_autoencoder_and_text_encoder_are_plain_keys():
    with initialize_config_dir(str(REPO / "configs" / "infer"), version_base=None):
        cfg = compose("infer", ["autoencoder=taesd", "text_encoder=/models/text_encoder"])
    assert cfg.autoencoder == "taesd" and cfg.text_encoder == "/models/text_encoder"
