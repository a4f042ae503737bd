"""The quickstart keeps its promise on a busy CPU: one thread, and a checkpoint, validation pictures and an export
long before the end."""

from types import SimpleNamespace

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO


def test_quickstart_writes_early_and_uses_one_thread():
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", ["experiment=quickstart"])
    assert cfg.threads == 1  # PyTorch's default threads ran 7x slower on the busy 2-core machine
    assert cfg.callbacks.checkpoint.every_n_train_steps <= 100 and cfg.trainer.val_check_interval <= 250
    assert cfg.trainer.val_check_interval < cfg.trainer.max_steps / 4
    export = instantiate(cfg.callbacks.export)
    assert str(export.out_dir) == f"{cfg.run_dir}/export" and export.options == {"ema": True, "diffusers": None}


def test_export_newest_exports_the_last_checkpoint_after_validation(tmp_path, monkeypatch):
    from latentup.training import export
    from latentup.training.callbacks import ExportNewest

    calls = []
    monkeypatch.setattr(export, "export_checkpoint",
                        lambda path, out, **options: calls.append((path, out, options)) or {"single_file": out})
    (tmp_path / "last.ckpt").write_bytes(b"checkpoint")
    callback = ExportNewest(tmp_path / "export", ema=True, diffusers=None)

    def trainer(zero=True, sanity=False, path=str(tmp_path / "last.ckpt")):
        return SimpleNamespace(is_global_zero=zero, sanity_checking=sanity, global_step=250,
                               checkpoint_callback=SimpleNamespace(last_model_path=path))

    for skipped in (trainer(zero=False), trainer(sanity=True), trainer(path=""), trainer(path=str(tmp_path / "no"))):
        callback.on_validation_end(skipped, None)
    assert calls == []
    callback.on_validation_end(trainer(), None)
    assert calls == [(str(tmp_path / "last.ckpt"), tmp_path / "export", {"ema": True, "diffusers": None})]


def test_logger_none_builds_a_trainer(tmp_path, monkeypatch):
    """``logger=none`` drops the learning-rate monitor, which Lightning refuses without a logger (a traceback)."""
    import importlib.util

    from lightning.pytorch.callbacks import LearningRateMonitor

    monkeypatch.setenv("LATENTUP_RUNS", str(tmp_path))
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", ["experiment=quickstart", "logger=none"])
    trainer = train.build_trainer(cfg)
    assert trainer.logger is None and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
