"""EpochTimer measures training batches only, not the epoch-end validation."""

from __future__ import annotations

import time

from conftest import quiet_trainer, write_cohort

from callbacks.epoch_timer import EpochTimer
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import LogisticRegression


class SlowValidation(LogisticRegression):
    def validation_step(self, batch, batch_idx):
        time.sleep(0.3)
        return super().validation_step(batch, batch_idx)


def test_validation_time_is_not_counted(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=12)), batch_size=64)
    timer = EpochTimer()
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(SlowValidation(knowledge=data.knowledge), datamodule=data)
    assert len(timer.epoch_seconds) == 2
    assert all(0 < s < 0.25 for s in timer.epoch_seconds), timer.epoch_seconds
