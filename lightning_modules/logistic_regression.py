"""Logistic-regression baseline (GAMENet/SafeDrug papers' "LR")."""

from __future__ import annotations

import torch
from torch import nn

from datamodules.batches import VisitBatch
from lightning_modules.base import MedRecModule
from lightning_modules.visit_ops import multi_hot


class LogisticRegression(MedRecModule):
    """One logistic regression per drug on the current visit's multi-hot diagnoses + procedures.

    p(drug m | visit t) = σ(w_mᵀ [x_diag(t) ‖ x_proc(t)] + b_m); each visit is independent, as
    in the reference baseline (one-vs-rest L2 logistic regression). The L2 penalty is Adam's
    ``weight_decay``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k = self.knowledge
        self.linear = nn.Linear(k.num_diagnoses + k.num_procedures, k.num_medications)

    def forward(self, batch: VisitBatch) -> torch.Tensor:
        k = self.knowledge
        features = torch.cat(
            [
                multi_hot(batch["diagnoses"], batch["diagnoses_mask"], k.num_diagnoses),
                multi_hot(batch["procedures"], batch["procedures_mask"], k.num_procedures),
            ],
            dim=-1,
        )
        return self.linear(features)
