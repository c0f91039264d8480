"""The run's checkpoints: the best ones by the monitored score, and ``last.ckpt`` after every epoch."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is the end of the latest epoch, which ``--ckpt_path last``
    resumes.

    Lightning (2.6) writes ``last.ckpt`` only in a step that also wrote a top-k checkpoint, so after
    an epoch that did not improve the monitored score ``last.ckpt`` stayed at the best epoch, and a
    resumed fit repeated epochs with stale weights, optimizer and controller state (GAMENet's
    temperature, SafeDrug's β). Here every validation (or training-epoch end, when the checkpoint
    saves there) that saved nothing writes ``last.ckpt`` too. Its checkpoint entry keeps
    ModelCheckpoint's name (``ModelCheckpoint{...}``), which ``--ckpt_path best`` reads.
    """

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def _save_latest(self, trainer: L.Trainer) -> None:
        # skipped when this step already saved (top-k and last), in sanity checking, fast_dev_run...
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
