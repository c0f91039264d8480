"""PrescriptionUpdater: medrec's own recommender, built from what the field's methods showed works.

It combines, in one batched model:

* the previous visit's *recorded* prescription as an input and as the set to update, which is
  what makes MICRON (Yang et al., IJCAI 2021) and COGNet's copy mechanism (Wu et al., WWW 2022)
  strong: most drugs of a visit were prescribed at the visit before;
* a causal GRU over the whole visit history (SafeDrug, GAMENet) next to the current visit;
* MICRON's two-threshold inference, generalised: a drug of the previous prescription is kept when
  its probability reaches ``keep_threshold``, a new drug is added when it reaches
  ``add_threshold`` (the first visit uses ``threshold``);
* SafeDrug's DDI loss with the PID-controlled weight β (Yang et al., IJCAI 2021, Eq. 18–19),
  the controller reading the DDI rate of the sets the model actually recommends.

Every option was chosen on the validation split only (docs/updater.md lists every configuration
tried with its validation Jaccard).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.knowledge import CohortKnowledge
from datamodules.options import DropoutRate, NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from lightning_modules.base import MedRecModule
from lightning_modules.ddi_loss import ddi_loss
from lightning_modules.metrics import batch_pair_counts
from lightning_modules.micron import set_scores
from lightning_modules.precision import float32
from lightning_modules.recommend import check_threshold
from lightning_modules.visit_ops import causal_gru, embed_codes, margin_targets, previous_visit


def updated_prescription(
    probs: torch.Tensor,
    previous: torch.Tensor,
    visit_mask: torch.Tensor,
    threshold: float,
    keep_threshold: float,
    add_threshold: float,
) -> torch.Tensor:
    """The recommended sets (B, T, M) bool: at the first visit ``probs >= threshold``; later, a drug
    of the previous recorded prescription when ``probs >= keep_threshold``, any other drug when
    ``probs >= add_threshold`` (MICRON's update S_t = (S_{t-1} ∪ {p >= δ_add}) \\ {p < δ_remove}
    with δ_remove = keep_threshold)."""
    first = torch.zeros_like(visit_mask, dtype=torch.bool)
    first[:, 0] = True
    later = torch.where(previous.bool(), probs >= keep_threshold, probs >= add_threshold)
    sets = torch.where(first.unsqueeze(-1), probs >= threshold, later)
    return sets & visit_mask.bool().unsqueeze(-1)


class UpdaterNetwork(nn.Module):
    """One member of :class:`PrescriptionUpdater`: x_t = [Σ e_d ; Σ e_p ; E_m m_{t-1}] (dropout), a
    causal GRU state g_t, and z_t = MLP([x_t ; g_t]) + m_{t-1} ⊙ c. ``previous_input=False`` drops
    E_m m_{t-1} and c, ``history=False`` drops g_t (the ablations)."""

    def __init__(
        self,
        diagnoses: int,
        procedures: int,
        medications: int,
        dim: int,
        hidden: int,
        dropout: float,
        previous_input: bool = True,
        history: bool = True,
    ):
        super().__init__()
        self.diag_embedding = nn.Embedding(diagnoses, dim)
        self.proc_embedding = nn.Embedding(procedures, dim)
        self.med_embedding = nn.Linear(medications, dim, bias=False) if previous_input else None
        self.dropout = nn.Dropout(dropout)
        width = (3 if previous_input else 2) * dim
        self.gru = nn.GRU(width, dim, batch_first=True) if history else None
        self.head = nn.Sequential(
            nn.Linear(width + (dim if history else 0), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, medications),
        )
        self.continuation = nn.Parameter(torch.zeros(medications)) if previous_input else None

    def forward(self, batch: dict[str, torch.Tensor], previous: torch.Tensor) -> torch.Tensor:
        parts = [
            embed_codes(self.diag_embedding, batch["diagnoses"], batch["diagnoses_mask"]),
            embed_codes(self.proc_embedding, batch["procedures"], batch["procedures_mask"]),
        ]
        if self.med_embedding is not None:
            parts.append(self.med_embedding(previous))
        visits = self.dropout(torch.cat(parts, dim=-1))
        if self.gru is not None:
            visits = torch.cat([visits, causal_gru(self.gru, visits, batch["lengths"])], dim=-1)
        logits = self.head(visits)
        return logits if self.continuation is None else logits + previous * self.continuation


class PrescriptionUpdater(MedRecModule):
    """Previous prescription + visit history -> the drugs to keep and to add.

    Visit vector (Eq. 1 of GAMENet/SafeDrug's code embeddings, summed): x_t = [Σ e_d ; Σ e_p ;
    E_m m_{t-1}], with dropout on the code embeddings and m_{t-1} the previous visit's recorded
    drugs (0 at the first visit). A causal GRU gives the history state g_t from x_1..x_t; the
    logits are z_t = MLP([x_t ; g_t]) + m_{t-1} ⊙ c, where c (one value per drug, learned) lets
    each drug's continuation differ from its initiation.

    Loss: β ((1 − w) BCE + w multilabel margin + λ soft-Jaccard) + (1 − β) s · L_ddi (SafeDrug
    Eq. 18, L_ddi the expected interaction mass pᵀAp, s = ``ddi_loss_scale``, λ =
    ``jaccard_weight``), for each of the ``members`` networks (their logits are averaged); β comes from the run's
    ``ddi_controller`` (PIDDDIController, Eq. 19) fed with the DDI rate of the recommended sets
    of the training batch, and is 1 without a controller.

    Inference: :func:`updated_prescription`; the shared metrics receive
    :func:`lightning_modules.micron.set_scores`, whose ``>= 0.5`` set is the recommendation.

    Args:
        embedding_dim: size of the code embeddings, the GRU state and the hidden layer (d).
        hidden_dim: width of the MLP's hidden layer.
        dropout: dropout on the code embeddings and the hidden layer.
        ddi_loss_scale: s, the scale of L_ddi in the loss.
        jaccard_weight: weight of a soft-Jaccard term 1 − Σpy / Σ(p + y − py) added to the accuracy loss.
        members: K networks trained side by side, each on its own loss; the logits are their mean.
        previous_input: give the network the previous prescription (E_m m_{t-1} and c); off, the
            update rule still keeps/adds relative to it (ablation).
        history: the GRU over the visit history (ablation).
        keep_threshold, add_threshold: the update's thresholds for previously prescribed and new drugs.
    """

    EVALUATION_SETTINGS = MedRecModule.EVALUATION_SETTINGS + ("keep_threshold", "add_threshold")

    def __init__(
        self,
        knowledge: CohortKnowledge | None = None,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        threshold: Probability = 0.5,
        margin_weight: Probability = 0.05,
        bootstrap_rounds: PositiveInt = 10,
        bootstrap_fraction: Probability = 0.8,
        bootstrap_seed: int = 0,
        embedding_dim: PositiveInt = 64,
        hidden_dim: PositiveInt = 256,
        dropout: DropoutRate = 0.4,
        ddi_loss_scale: NonNegativeFloat = 0.05,
        jaccard_weight: NonNegativeFloat = 0.0,
        members: PositiveInt = 1,
        previous_input: bool = True,
        history: bool = True,
        keep_threshold: Probability = 0.5,
        add_threshold: Probability = 0.5,
    ):
        super().__init__(
            knowledge,
            lr=lr,
            weight_decay=weight_decay,
            threshold=threshold,
            margin_weight=margin_weight,
            bootstrap_rounds=bootstrap_rounds,
            bootstrap_fraction=bootstrap_fraction,
            bootstrap_seed=bootstrap_seed,
        )
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        for name, value in (("keep_threshold", keep_threshold), ("add_threshold", add_threshold)):
            check_threshold(value, f"{name} (--model.init_args.{name})")  # a Python caller bypasses the CLI's type
        k = self.knowledge
        self.members = nn.ModuleList(
            UpdaterNetwork(
                k.num_diagnoses,
                k.num_procedures,
                k.num_medications,
                embedding_dim,
                hidden_dim,
                dropout,
                previous_input,
                history,
            )
            for _ in range(members)
        )
        self.ddi_controller = None  # set by a PIDDDIController for the fit

    def member_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(K, B, T, M) logits of the K members; padded visits give 0."""
        previous = previous_visit(batch["medications"])
        mask = batch["visit_mask"].unsqueeze(-1)
        return torch.stack([member(batch, previous) * mask.to(previous.dtype) for member in self.members])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits z_t (B, T, M) of every visit, the mean over the members; padded visits give 0."""
        return self.member_logits(batch).mean(0)

    def recommended_sets(self, probs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        previous = previous_visit(batch["medications"])
        return updated_prescription(
            probs, previous, batch["visit_mask"], hp.threshold, hp.keep_threshold, hp.add_threshold
        )

    def predict_probabilities(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch)
        with float32(logits):
            probs = torch.sigmoid(logits.float())
            scores = set_scores(self.recommended_sets(probs, batch), probs)
            return scores * batch["visit_mask"].unsqueeze(-1).to(scores.dtype)

    def compute_loss(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], beta: float | torch.Tensor = 1.0
    ) -> dict[str, torch.Tensor]:
        """β accuracy + (1 − β) s L_ddi of (B, T, M) logits, or the mean over members of (K, B, T, M);
        entries other than ``loss`` are logged."""
        if logits.dim() == 4:
            parts = [self.compute_loss(member, batch, beta) for member in logits]
            return {key: torch.stack([p[key] for p in parts]).mean() for key in parts[0]}
        with float32(logits):
            logits = logits.float()
            mask = batch["visit_mask"]
            flat, target = logits[mask], batch["medications"][mask]
            probs = torch.sigmoid(flat)
            w = self.hparams.margin_weight
            out = {
                "bce": F.binary_cross_entropy_with_logits(flat, target),
                "margin": F.multilabel_margin_loss(probs, margin_targets(target)),
                "ddi": self.hparams.ddi_loss_scale * ddi_loss(torch.sigmoid(logits), self.ddi_adj, mask),
            }
            accuracy = (1 - w) * out["bce"] + w * out["margin"]
            if self.hparams.jaccard_weight > 0:
                overlap = (probs * target).sum(-1)
                out["jaccard"] = 1 - (overlap / (probs.sum(-1) + target.sum(-1) - overlap).clamp(min=1e-6)).mean()
                accuracy = accuracy + self.hparams.jaccard_weight * out["jaccard"]
            beta = torch.as_tensor(beta, dtype=accuracy.dtype, device=accuracy.device)
            out["loss"] = beta * accuracy + (1 - beta) * out["ddi"]
            return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        members = self.member_logits(batch)
        beta = 1.0
        if self.ddi_controller is not None:
            with torch.no_grad():
                sets = self.recommended_sets(torch.sigmoid(members.mean(0).float()), batch)
                counts = batch_pair_counts(sets.float(), batch["visit_mask"], self.ddi_adj)
            beta = self.ddi_controller.update(*counts)
        losses = self.compute_loss(members, batch, beta)
        self.log_train_losses(losses, batch_size=len(batch["lengths"]))
        return losses["loss"]
