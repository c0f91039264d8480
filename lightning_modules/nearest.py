"""Non-parametric baselines: drug frequency and "Nearest" (repeat the previous visit)."""

from __future__ import annotations

import torch
from torch import nn

from datamodules.batches import VisitBatch
from datamodules.cohort import CohortError
from lightning_modules.base import MedRecModule
from lightning_modules.visit_ops import previous_visit


class DrugFrequency(MedRecModule):
    """Recommends every drug prescribed in at least ``threshold`` of training visits.

    Probability of drug m = its share of training visits: the knowledge's ``drug_prevalence``,
    which the DataModule counts once over its training split (each training visit once, however
    DDP splits the patients), so the model is complete when built and a fit only writes the
    checkpoint.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.knowledge.drug_prevalence is None:
            raise CohortError(f"{type(self).__name__} needs the knowledge's drug_prevalence (set by the DataModule)")
        self.automatic_optimization = False
        self.register_buffer("prevalence", torch.tensor(self.knowledge.drug_prevalence, dtype=torch.float32))  # a copy
        # Lightning wraps the module in DistributedDataParallel to fit under DDP, and DDP refuses
        # a module without a trainable parameter. This scalar is never used or optimised; it only
        # lets the wrapper accept the model.
        self.ddp_anchor = nn.Parameter(torch.zeros(()))

    def training_step(self, batch: VisitBatch, batch_idx: int) -> None:
        """Nothing to learn: the prevalence comes with the knowledge."""

    def forward(self, batch: VisitBatch) -> torch.Tensor:
        return torch.logit(self.predict_probabilities(batch), eps=1e-6)

    def predict_probabilities(self, batch: VisitBatch) -> torch.Tensor:
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

    def predict_probabilities(self, batch: VisitBatch) -> torch.Tensor:
        prevalence = super().predict_probabilities(batch)
        previous = previous_visit(batch["medications"])
        first = torch.zeros_like(batch["visit_mask"])
        first[:, 0] = True
        scored = 0.5 * previous + 0.5 * prevalence
        return torch.where(first.unsqueeze(-1), prevalence, scored)
