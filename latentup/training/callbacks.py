"""Training callbacks: step timing (steps/s, samples/s) written to ``timing.json`` at the end of training, a
progress bar counted in optimizer steps, early exports of the newest checkpoint, and the removal of checkpoints a
killed run left half-written."""

import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from latentup.atomic import stale_temporaries, write_text_atomic
from latentup.training.folders import log_dir


class StepTimer(L.Callback):
    """Wall time of training batches (validation excluded), logged as ``train/steps_per_sec`` every
    ``every_n_steps`` and summarised in ``<log_dir>/timing.json``; the first ``warmup`` batches are not timed."""

    def __init__(self, every_n_steps: int = 50, warmup: int = 5):
        self.every_n_steps, self.warmup = every_n_steps, warmup
        self.seconds, self.batches, self.samples, self.seen = 0.0, 0, 0, 0
        self._start: float | None = None
        self._run_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._run_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self._start is None or self.seen <= self.warmup:
            return
        self.seconds += time.perf_counter() - self._start
        self.batches += 1
        self.samples += len(batch["position"]) * trainer.world_size
        if trainer.global_step % self.every_n_steps == 0 and self.seconds > 0:
            pl_module.log("train/steps_per_sec", self.batches / self.seconds, rank_zero_only=True)

    def summary(self) -> dict:
        return {"timed_batches": self.batches, "seconds": self.seconds,
                "batches_per_sec": self.batches / self.seconds if self.seconds else None,
                "samples_per_sec": self.samples / self.seconds if self.seconds else None,
                "train_wall_seconds": time.perf_counter() - self._run_start}

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_text_atomic(log_dir(trainer) / "timing.json", json.dumps(self.summary(), indent=2))


class StepProgressBar(TQDMProgressBar):
    """The training bar as ``global_step / max_steps``: the stream has no length, so Lightning's own bar shows
    ``batch/?``. Rate and ETA count from this call's first step, so a resumed run does not credit restored steps."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = bar.last_print_n = trainer.global_step
        bar.set_description("Training steps")

    def on_train_epoch_start(self, trainer, *_) -> None:
        """One bar for the whole run: not reset per epoch (a run resumed part-way through an epoch skips this hook)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


class RemovePartialCheckpoints(L.Callback):
    """Before training, delete the hidden temporaries (``.step0000250.<random>.ckpt``) that a run killed while
    writing a checkpoint left in the checkpoint folders (``AtomicCheckpointIO`` never renamed them: they are
    incomplete). Rank zero only, before any checkpoint of this run is written."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            for partial in stale_temporaries(callback.dirpath or "", ".ckpt"):
                partial.unlink(missing_ok=True)
                print(f"removed the partial checkpoint {partial} of an interrupted run")


class ExportNewest(L.Callback):
    """After each validation during ``fit``, export the newest checkpoint (``last.ckpt``) to ``out_dir``, as
    ``train.py stage=export`` would (``options``: ``export_checkpoint``'s ``ema``, ``diffusers``), so that a run has a
    usable model long before it ends; the export at the end of ``fit`` replaces it. Rank zero only."""

    def __init__(self, out_dir, **options):
        self.out_dir, self.options = Path(out_dir), options

    def on_validation_end(self, trainer, pl_module) -> None:
        newest = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if trainer.is_global_zero and not trainer.sanity_checking and newest and Path(newest).is_file():
            from latentup.training.export import export_checkpoint

            written = export_checkpoint(newest, self.out_dir, **self.options)
            print(f"step {trainer.global_step}: exported {newest} to {written['single_file']}")
