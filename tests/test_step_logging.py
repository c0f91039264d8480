"""Training figures: step values on the logger's steps, epoch means weighted by batch size, few log calls."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_modules.step_logging import log_epoch_means, log_step_and_epoch


class Scripted(L.LightningModule):
    """Logs figure = epoch * 10 + batch_idx + 1 at every step; counts Lightning's log calls."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.log_calls = 0

    def log(self, *args, **kwargs):
        self.log_calls += 1
        return super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        value = torch.tensor(float(self.current_epoch * 10 + batch_idx + 1))
        log_step_and_epoch(self, {"figure": value}, batch_size=len(batch))
        return (self.weight * batch.sum()) ** 2

    def on_train_epoch_end(self):
        log_epoch_means(self)  # as MedRecModule does, for an epoch cut short

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loader(items=10, batch_size=4):
    return DataLoader(torch.arange(items, dtype=torch.float32), batch_size=batch_size)  # batches of 4, 4, 2


def test_epoch_mean_is_weighted_by_batch_size_and_step_figures_follow_the_logger(tmp_path):
    model = Scripted()
    trainer = quiet_trainer(max_epochs=2, log_every_n_steps=2, logger=CSVLogger(tmp_path, name="r", version=0))
    trainer.fit(model, loader())
    rows = list(csv.DictReader(open(tmp_path / "r" / "version_0" / "metrics.csv")))
    epochs = [(int(r["epoch"]), float(r["figure_epoch"])) for r in rows if r.get("figure_epoch")]
    # (1·4 + 2·4 + 3·2) / 10 and (11·4 + 12·4 + 13·2) / 10: the old per-step self.log gave the same
    assert epochs == [(0, pytest.approx(1.8)), (1, pytest.approx(11.8))]
    steps = [(int(r["step"]), float(r["figure_step"])) for r in rows if r.get("figure_step")]
    # Lightning writes step figures every log_every_n_steps: after the 2nd, 4th and 6th step
    assert steps == [(1, 2.0), (3, 11.0), (5, 13.0)]
    assert float(trainer.callback_metrics["figure_step"]) == 13.0  # the last step's
    # two step figures an epoch (one written + the last batch) and one epoch mean, not 2 per batch
    assert model.log_calls == 2 * (2 + 1)


def test_an_epoch_cut_short_still_logs_its_mean(tmp_path):
    model = Scripted()
    trainer = quiet_trainer(max_steps=2, logger=CSVLogger(tmp_path, name="r", version=0))
    trainer.fit(model, loader())
    assert float(trainer.callback_metrics["figure_epoch"]) == pytest.approx((1 * 4 + 2 * 4) / 8)


def test_an_interrupted_epoch_does_not_leak_into_the_next_fit(tmp_path):
    model = Scripted()
    # what a fit that crashed in its epoch 0 left behind
    model.__dict__["_epoch_figure_sums"] = (quiet_trainer(), 0, {"figure": (torch.tensor(1000.0), 1)})
    trainer = quiet_trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="r", version=0))
    trainer.fit(model, loader())
    assert float(trainer.callback_metrics["figure_epoch"]) == pytest.approx(1.8)
