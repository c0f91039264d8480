"""Fits under DDP (2 CPU processes, gloo) for the models DDP used to refuse or could split.

Full 2-process fits of every config through train.py: benchmarks/ddp_fit_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from datamodules.package_graph import PackageGraphDataModule
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import DPRWG, DrugFrequency, MiranDa


class RankAgreement(L.Callback):
    """At fit end, rank 0 writes the largest difference of any state_dict entry between ranks."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        state = pl_module.state_dict()
        flat = torch.cat([v.detach().reshape(-1).double() for v in state.values() if v.is_floating_point()])
        gathered = trainer.strategy.all_gather(flat.nan_to_num(nan=0.0))
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps({"diff": float((gathered[0] - gathered[1]).abs().max())}))


class NoisyPretrainDPR(DPRWG):
    """DPR-WG whose pre-training ends differently on each rank, as nondeterministic GPU kernels may."""

    def pretrain(self) -> list[float]:
        history = super().pretrain()
        with torch.no_grad():
            for p in self.ncf.parameters():
                p.add_(0.01 * (self.global_rank + 1))
        return history


def fit_on_two_processes(model, data, tmp_path, **trainer_kwargs) -> tuple[float, L.LightningModule]:
    """Fits on 2 processes; (largest state difference between the ranks, the fitted model)."""
    path = tmp_path / "agreement.json"
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        callbacks=[RankAgreement(str(path))],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    return json.loads(path.read_text())["diff"], model


@pytest.mark.slow
@pytest.mark.parametrize(
    "split",
    [
        {},  # 100 training patients: 50 per rank
        # 99: the training sampler gives one rank a repeated patient, who must not count twice
        {"split": "random", "split_ratios": (0.66, 0.17, 0.17)},
    ],
)
def test_frequency_counts_every_training_visit_once_under_ddp(tiny_cohort_dir, tmp_path, split):
    # A parameter-free model used to stop DDP ("DistributedDataParallel is not needed ...").
    data = VisitSequenceDataModule(root=str(tiny_cohort_dir), batch_size=16, **split)
    assert len(data.splits["train"]) == (99 if split else 100)
    diff, model = fit_on_two_processes(DrugFrequency(knowledge=data.knowledge), data, tmp_path)
    assert diff == 0.0
    train = data.cohort.visits[data.cohort.visits["patient_id"].isin(data.splits["train"])]
    counts = torch.zeros(data.knowledge.num_medications)
    for meds in train["medications"]:
        counts[list(meds)] += 1
    torch.testing.assert_close(model.prevalence, counts / len(train))


@pytest.mark.slow
def test_miranda_fits_under_ddp(tiny_cohort_dir, tmp_path):
    # Its modules of unused feature types (previous-visit drugs by default) used to stop DDP.
    data = VisitSequenceDataModule(root=str(tiny_cohort_dir), batch_size=16)
    torch.manual_seed(0)
    model = MiranDa(knowledge=data.knowledge, embedding_dim=8, heads=2, top_k=5)
    diff, _ = fit_on_two_processes(model, data, tmp_path, limit_train_batches=2)
    assert diff == 0.0


@pytest.mark.slow
def test_dpr_ranks_share_rank_zero_pretraining(tiny_cohort_dir, tmp_path):
    data = PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=16, negative_packages=2)
    torch.manual_seed(0)
    model = NoisyPretrainDPR(knowledge=data.knowledge, embedding_dim=8, hidden_dim=8, pretrain_epochs=1)
    diff, _ = fit_on_two_processes(model, data, tmp_path, limit_train_batches=1)
    assert diff == 0.0


def test_frequency_checkpoints_from_before_the_ddp_anchor_load(tiny_datamodule):
    old = DrugFrequency(knowledge=tiny_datamodule.knowledge).state_dict()
    del old["ddp_anchor"]
    old["prevalence"] = torch.linspace(0, 1, len(old["prevalence"]))
    model = DrugFrequency(knowledge=tiny_datamodule.knowledge)
    model.load_state_dict(old)  # strict
    torch.testing.assert_close(model.prevalence, old["prevalence"])
