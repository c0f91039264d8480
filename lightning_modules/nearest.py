"""Non-parametric baselines: drug frequency and "Nearest" (repeat the previous visit)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.base import MedRecModule
from lightning_modules.visit_ops import previous_visit


def _default_anchor(module, state_dict, prefix, *args) -> None:
    state_dict.setdefault(f"{prefix}ddp_anchor", torch.zeros(()))


class DrugFrequency(MedRecModule):
    """Recommends every drug prescribed in at least ``threshold`` of training visits.

    Probability of drug m = its share of training visits. "Training" is one counting pass, kept
    per training patient: under DDP the training sampler repeats a few patients to give every
    rank the same number, and a repeated patient only rewrites its own row. The rows are merged
    across ranks (max: a patient's row is the same wherever it was counted) before use, so every
    rank holds the same prevalence, and each training visit counts once.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.register_buffer("prevalence", torch.zeros(self.num_medications))
        self._patient_drugs = torch.zeros(0, self.num_medications)  # (training patients, M) this epoch
        self._patient_visits = torch.zeros(0)
        # Lightning wraps the module in DistributedDataParallel to fit under DDP, and DDP refuses
        # a module without a trainable parameter. This scalar is never used or optimised; it only
        # lets the wrapper accept the model. Checkpoints saved before it existed still load.
        self.ddp_anchor = nn.Parameter(torch.zeros(()))
        self.register_load_state_dict_pre_hook(_default_anchor)

    def on_train_epoch_start(self) -> None:
        self._patient_drugs = torch.zeros(0, self.num_medications, device=self.device)
        self._patient_visits = torch.zeros(0, device=self.device)

    def _grow(self, rows: int) -> None:
        extra = rows - len(self._patient_visits)
        if extra > 0:
            self._patient_drugs = torch.cat(
                [self._patient_drugs, self._patient_drugs.new_zeros(extra, self.num_medications)]
            )
            self._patient_visits = torch.cat([self._patient_visits, self._patient_visits.new_zeros(extra)])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        mask = batch["visit_mask"]
        rows = batch["patient_index"].to(self.device)
        self._grow(int(rows.max()) + 1)
        self._patient_drugs[rows] = (batch["medications"] * mask.unsqueeze(-1)).sum(1).float()
        self._patient_visits[rows] = mask.sum(1).float()

    def _refresh_prevalence(self) -> None:
        strategy = self.trainer.strategy
        self._patient_drugs = self._patient_drugs.to(self.device)
        self._patient_visits = self._patient_visits.to(self.device)
        rows = strategy.reduce(torch.tensor(len(self._patient_visits), device=self.device), reduce_op="max")
        self._grow(int(rows))
        drugs = strategy.reduce(self._patient_drugs.clone(), reduce_op="max")
        visits = strategy.reduce(self._patient_visits.clone(), reduce_op="max").sum()
        if visits > 0:
            self.prevalence.copy_(drugs.sum(0) / visits)

    # Validation runs inside the training epoch, before on_train_epoch_end.
    def on_validation_epoch_start(self) -> None:
        if self.trainer.training or self.trainer.state.fn == "fit":
            self._refresh_prevalence()

    def on_train_epoch_end(self) -> None:
        self._refresh_prevalence()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.logit(self.predict_probabilities(batch), eps=1e-6)

    def predict_probabilities(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.prevalence.expand(*batch["visit_mask"].shape, -1)

    def configure_optimizers(self):
        return None


class Nearest(DrugFrequency):
    """Repeats the previous visit's drugs (the papers' "Nearest" baseline).

    Score = 0.5 · previous-visit indicator + 0.5 · training prevalence, so the recommended set
    (score >= 0.5) is exactly the previous visit's drugs, ranked first, with the rest ranked by
    prevalence for PRAUC. A patient's first visit has no previous visit and falls back to the
    frequency baseline (drugs in at least half of the training visits).
    """

    def predict_probabilities(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        prevalence = super().predict_probabilities(batch)
        previous = previous_visit(batch["medications"])
        first = torch.zeros_like(batch["visit_mask"])
        first[:, 0] = True
        scored = 0.5 * previous + 0.5 * prevalence
        return torch.where(first.unsqueeze(-1), prevalence, scored)
