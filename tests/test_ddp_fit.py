"""Fits under DDP (2 CPU processes, gloo) for the models DDP used to refuse or could split, and the
DDI controllers (SafeDrug's PID β, GAMENet's annealing switch) taking the same steps on every rank.

Full 2-process fits of every config through train.py, 1 vs 2 process test figures: the report of
benchmarks/ddp_fit_check.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from callbacks import PIDDDIController
from datamodules.package_graph import PackageGraphDataModule
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import DPRWG, DrugFrequency, MiranDa, SafeDrug

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ddp_fit_check import RankStateRecorder  # noqa: E402


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

    def pretrain(self, *args, **kwargs) -> list[float]:
        history = super().pretrain(*args, **kwargs)
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


@pytest.mark.slow
def test_ddi_annealing_takes_the_same_decisions_on_every_rank(tiny_cohort_dir, tmp_path):
    # Each rank sees other patients, hence other local pair counts; the callback sums them over the
    # ranks and draws from a generator seeded alike everywhere.
    script = Path(__file__).with_name("ddp_annealing_run.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tiny_cohort_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0) == len(r1) == 10  # 50 training patients per rank, 5 a batch
    assert [a[2] for a in r0] == [b[2] for b in r1]
    assert any(a[:2] != b[:2] for a, b in zip(r0, r1))  # the ranks counted different pairs
    assert 0 < sum(a[2] for a in r0) < len(r0)  # both outcomes were drawn


@pytest.mark.slow
def test_pid_controller_and_weights_agree_across_ranks(tiny_cohort_dir, tmp_path):
    # Target DDI 0 lies under what the model predicts, so β moves at every step from the DDI rate
    # all-reduced over both ranks' batches; a rank acting on its own rate would drift apart.
    data = VisitSequenceDataModule(root=str(tiny_cohort_dir), batch_size=16)
    torch.manual_seed(0)
    model = SafeDrug(knowledge=data.knowledge, embedding_dim=8)
    controller = PIDDDIController(target_ddi=0.0, kp=0.05)
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        callbacks=[controller, RankStateRecorder(str(tmp_path))],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=3,
    )
    trainer.fit(model, datamodule=data)
    r0, r1 = (json.loads((tmp_path / f"fit_rank{r}.json").read_text())["trace"] for r in (0, 1))
    assert len(r0) == 3 and r0 == r1
    betas = [step["pid"]["beta"] for step in r0]
    assert len(set(betas)) == 3  # β moved at every step
    s0, s1 = (torch.load(tmp_path / f"fit_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
