"""Shared base of the package recommenders (DPR, its NCF/NN baselines).

DPR (Zheng et al., WWW 2021) does not score drugs one by one: for every visit it searches the
training visits for the most similar patients, takes their packages as candidates and picks
one. ``PackageRecModule`` owns that protocol so every package method is evaluated the same
way, and the same way as the sequence methods:

* at the start of every validation/test/predict loop the candidate pool (training visits and
  their packages: ``PackageKnowledge.training_visits``, which travels with the model and its
  checkpoint) is embedded with the model's retrieval encoder (``retrieval_embedding``: the
  pre-trained patient embedding);
* subclasses turn each visit into drug probabilities (``visit_probabilities``); a chosen
  package becomes probabilities >= 0.5 for its drugs and < 0.5 for the rest, ranked by the
  candidates' votes (``package_probabilities``), so the shared SafeDrug-reference metrics
  (Jaccard, precision, recall, F1, PRAUC, DDI rate, bootstrap test) apply unchanged;
* training batches are flat visits (``training_loss`` returns the loss dict).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules.batches import (
    CandidatePool,
    PackageEvalBatch,
    PackageHistoryBatch,
    PackagePairBatch,
    VisitDescriptions,
)
from datamodules.cohort import CohortError
from datamodules.options import NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from datamodules.package_graph import HistoryCollator, PackageKnowledge
from datamodules.package_graph.knowledge import DESCRIPTION_KEYS
from lightning_modules.base import MedRecModule
from lightning_modules.layers import PackageGraphBuilder, nearest_candidates

POOL_CHUNK = 4096


def package_probabilities(packages: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor, num_medications: int):
    """Drug probabilities of a package choice.

    Args:
        packages: (N, C, L) candidate packages as drug indices, -1 padded (whole rows -1 = no
            candidate).
        scores: (N, C) candidate scores, -inf for missing candidates.
        chosen: (N,) index of the chosen candidate.

    Returns (N, M): 0.5 + 0.5·v for the chosen package's drugs and 0.499·v for the others,
    where v is the softmax(scores)-weighted share of candidates holding the drug. The
    recommended set (>= 0.5) is exactly the chosen package; the vote orders the list for PRAUC.
    """
    n, c, _ = packages.shape
    hot = packages.new_zeros(n, c, num_medications + 1, dtype=torch.float32)
    hot.scatter_(2, packages.clamp(min=-1) % (num_medications + 1), 1.0)  # -1 lands in the spare column
    hot = hot[..., :num_medications]
    valid = torch.isfinite(scores)
    weights = torch.where(valid, scores, torch.full_like(scores, -1e9)).softmax(1) * valid
    vote = (weights.unsqueeze(-1) * hot).sum(1)
    picked = hot[torch.arange(n, device=hot.device), chosen] > 0
    picked &= valid[torch.arange(n, device=hot.device), chosen].unsqueeze(-1)
    return torch.where(picked, 0.5 + 0.5 * vote, 0.499 * vote)


class PackageRecModule(MedRecModule):
    """Base for recommenders that choose a drug package per visit (DPR §5 protocol).

    Args:
        knowledge: the ``PackageGraphDataModule``'s knowledge (linked by train.py).
        lr, weight_decay: Adam settings (weight decay is the L2 term of the BPR objectives).
        bootstrap_rounds, bootstrap_fraction, bootstrap_seed: the shared test protocol.
    """

    KNOWLEDGE_CLASS = PackageKnowledge
    # a chosen package is the recommendation: no threshold or margin loss to set
    FIXED_SETTINGS = ("threshold", "margin_weight")

    def __init__(
        self,
        knowledge: PackageKnowledge | None = None,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        bootstrap_rounds: PositiveInt = 10,
        bootstrap_fraction: Probability = 0.8,
        bootstrap_seed: int = 0,
    ):
        super().__init__(
            knowledge,
            lr=lr,
            weight_decay=weight_decay,
            bootstrap_rounds=bootstrap_rounds,
            bootstrap_fraction=bootstrap_fraction,
            bootstrap_seed=bootstrap_seed,
        )
        if not isinstance(knowledge, PackageKnowledge) or knowledge.training_visits is None:
            raise CohortError(
                f"{type(self).__name__} needs the knowledge of datamodules.PackageGraphDataModule "
                f"(set data.class_path to it), got {type(knowledge).__name__}"
            )
        self.graph_builder = PackageGraphBuilder.from_knowledge(knowledge)
        self._pool: dict | None = None

    # --- hooks for subclasses ------------------------------------------------------------
    def retrieval_embedding(self, batch: VisitDescriptions) -> torch.Tensor:  # pragma: no cover
        """(N, d) patient embeddings used to find similar training patients."""
        raise NotImplementedError

    def visit_probabilities(self, batch: PackageEvalBatch) -> torch.Tensor:  # pragma: no cover
        """(N, M) drug probabilities of every real visit of an evaluation batch."""
        raise NotImplementedError

    def training_loss(self, batch: PackagePairBatch) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    # --- protocol ------------------------------------------------------------------------
    def forward(self, batch: PackageEvalBatch) -> torch.Tensor:
        """Package recommenders have no per-drug logits: they choose a package per visit."""
        raise NotImplementedError(
            f"{type(self).__name__} chooses a package per visit and has no drug logits; call predict_probabilities"
        )

    def predict_probabilities(self, batch: PackageEvalBatch) -> torch.Tensor:
        mask = batch["visit_mask"]
        per_visit = self.visit_probabilities(batch)
        probs = per_visit.new_zeros(*mask.shape, self.num_medications)
        probs[mask] = per_visit
        return probs

    def collate_histories(self, samples: list[dict]) -> PackageHistoryBatch:
        """Patients given by codes -> the evaluation layout, descriptions built from the codes."""
        return HistoryCollator(self.knowledge)(samples)

    def training_step(self, batch: PackagePairBatch, batch_idx: int) -> torch.Tensor:
        losses = self.training_loss(batch)
        self.log_train_losses(losses, batch_size=len(batch["document"]))
        return losses["loss"]

    # --- candidate pool ------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self.refresh_pool()

    def on_test_start(self) -> None:
        self.refresh_pool()

    def on_predict_start(self) -> None:
        self.refresh_pool()

    def refresh_pool(self, pool: CandidatePool | None = None) -> None:
        """Embed the training visits (the knowledge's pool, or ``pool``) with the current retrieval encoder."""
        if pool is None:
            pool = self.knowledge.training_visits.pool()
        was_training = self.training
        self.eval()
        embeddings = []
        with torch.no_grad():
            for start in range(0, len(pool["patient_key"]), POOL_CHUNK):
                part = {key: pool[key][start : start + POOL_CHUNK].to(self.device) for key in DESCRIPTION_KEYS}
                embeddings.append(self.retrieval_embedding(part))
        self.train(was_training)
        self._pool = {
            "embedding": torch.cat(embeddings) if embeddings else torch.zeros(0, 1, device=self.device),
            "patient_key": pool["patient_key"].to(self.device),
            "package_id": pool["package_id"].to(self.device),
            "packages": pool["packages"].to(self.device),
            "k": int(pool["k"]),
        }

    @property
    def pool(self) -> dict:
        if self._pool is None:
            self.refresh_pool()
        return self._pool

    def candidates(self, batch: VisitDescriptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(package ids (N, k), similarity (N, k), packages (N, k, L)) of every real visit."""
        pool = self.pool
        with torch.no_grad():
            query = self.retrieval_embedding(batch)
        ids, similarity = nearest_candidates(
            query, batch["patient_key"], pool["embedding"], pool["patient_key"], pool["package_id"], pool["k"]
        )
        packages = pool["packages"][ids.clamp(min=0)].masked_fill((ids < 0).unsqueeze(-1), -1)
        return ids, similarity, packages


def bpr_package_loss(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """BPR (DPR Eq. 15): mean of -ln σ(y⁺ - y⁻) = softplus(y⁻ - y⁺); (N,), (N, r) -> scalar.

    Negatives scored -inf (missing) are left out of the mean.
    """
    present = torch.isfinite(negative)
    losses = F.softplus(negative.masked_fill(~present, 0.0) - positive.unsqueeze(-1))
    return (losses * present).sum() / present.sum().clamp(min=1)
