"""DPR's package-generation heuristic (Zheng et al., WWW 2021, §6), on multi-hot tensors.

Starting from S1, the candidate packages of the most similar training patients, two rule sets
derive new packages, which DPR then scores together with S1:

* S2 (personalise): from every S1 package drop the drugs that are *rare in S1* (held by few
  candidates) and *low in the personal list l* (the patient's NCF ranking); add the drugs that
  are *unpopular* overall (low in the popularity list L) but *high in l* — drugs this patient
  needs that popularity-driven candidates miss;
* S3 (interactions): to every S1 package add the high-l drugs that have a synergism with, or
  co-occur often with, a drug of the package; of every antagonistic pair in the package that
  rarely co-occurs, drop the drug ranked lower in l.

All rules act on (N, C, M) bool tensors for all visits and candidates at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from datamodules.batches import PackageEvalBatch
from datamodules.knowledge import CohortKnowledge
from lightning_modules.base import visit_ids
from lightning_modules.package_rec import package_probabilities
from lightning_modules.recommend import visit_record

SYNERGY, ANTAGONISM = 1, 2


@dataclass(frozen=True)
class GenerationRules:
    """Cut-offs of the heuristic; K is the mean training package size.

    Attributes:
        high: a drug is high in l if its rank < high·K.
        low: a drug is low in l if its rank >= low·K.
        rare: a drug is rare in S1 if held by fewer than this share of the candidates.
        unpopular: a drug is low in L if held by fewer than this share of training packages.
        frequent: co-occurrence p above which two drugs "co-occur often".
        seldom: co-occurrence p (both directions) below which a pair "rarely co-occurs".
    """

    high: float = 1.0
    low: float = 2.0
    rare: float = 0.3
    unpopular: float = 0.1
    frequent: float = 0.3
    seldom: float = 0.05


def personal_rank(scores: torch.Tensor) -> torch.Tensor:
    """(N, M) preference scores -> rank of each drug in the personal list l (0 = first)."""
    return scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


def personalise(
    s1: torch.Tensor,
    valid: torch.Tensor,
    rank: torch.Tensor,
    popularity: torch.Tensor,
    k: float,
    rules: GenerationRules = GenerationRules(),
) -> torch.Tensor:
    """S2: (N, C, M) candidates, (N, C) valid, (N, M) ranks, (M,) popularity -> (N, C, M)."""
    s1 = s1 & valid.unsqueeze(-1)
    share = s1.sum(1).float() / valid.sum(1, keepdim=True).clamp(min=1)
    drop = (share < rules.rare) & (rank >= rules.low * k)
    add = (popularity < rules.unpopular).unsqueeze(0) & (rank < rules.high * k)
    return ((s1 & ~drop.unsqueeze(1)) | add.unsqueeze(1)) & valid.unsqueeze(-1)


def mind_interactions(
    s1: torch.Tensor,
    valid: torch.Tensor,
    rank: torch.Tensor,
    relation: torch.Tensor,
    cooccurrence: torch.Tensor,
    k: float,
    rules: GenerationRules = GenerationRules(),
) -> torch.Tensor:
    """S3: add synergistic/co-occurring high-l drugs, drop the lower-l drug of rare antagonistic pairs."""
    s1 = s1 & valid.unsqueeze(-1)
    linked = (relation == SYNERGY) | (cooccurrence > rules.frequent)
    linked = linked | linked.T
    linked.fill_diagonal_(False)
    high = rank < rules.high * k
    add = ((s1.float() @ linked.float()) > 0) & high.unsqueeze(1) & ~s1
    antagonistic = (relation == ANTAGONISM) | (relation.T == ANTAGONISM)
    antagonistic &= (cooccurrence < rules.seldom) & (cooccurrence.T < rules.seldom)
    antagonistic.fill_diagonal_(False)
    # pair (a, b) in the package, antagonistic, a ranked before b in l: drop b
    before = rank.unsqueeze(2) < rank.unsqueeze(1)  # (N, a, b)
    pairs = s1.unsqueeze(3) & s1.unsqueeze(2) & antagonistic & before.unsqueeze(1)
    drop = pairs.any(2)
    return ((s1 | add) & ~drop) & valid.unsqueeze(-1)


def to_index_lists(hot: torch.Tensor) -> torch.Tensor:
    """(…, M) bool packages -> (…, L) drug indices ascending, -1 padded (L = largest package)."""
    width = max(int(hot.sum(-1).max()) if hot.numel() else 0, 1)
    order = torch.argsort((~hot).to(torch.int8), dim=-1, stable=True)[..., :width]
    return torch.where(hot.gather(-1, order), order, torch.full_like(order, -1))


def to_multi_hot(packages: torch.Tensor, num_medications: int) -> torch.Tensor:
    """(…, L) -1 padded drug indices -> (…, M) bool."""
    hot = torch.zeros(*packages.shape[:-1], num_medications + 1, dtype=torch.bool, device=packages.device)
    hot.scatter_(-1, packages % (num_medications + 1), True)
    return hot[..., :num_medications]


def set_f1(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-row F1 of two (N, M) bool sets (0 when either is empty)."""
    inter = (predicted & truth).sum(-1).float()
    precision = inter / predicted.sum(-1).clamp(min=1)
    recall = inter / truth.sum(-1).clamp(min=1)
    return torch.where(inter > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)


def heuristic_records(
    batch: PackageEvalBatch, generated: dict[str, torch.Tensor], knowledge: CohortKnowledge
) -> list[dict]:
    """Predict records of the heuristic (``DPR.generate``'s output) for every real visit: the
    heuristic choice as the recommendation, ``source`` (S1/S2/S3 it came from), its ``f1``
    against the visit's true package, and the non-heuristic choice (``candidate_drugs``,
    ``candidate_f1``) for comparison."""
    packages, choice = generated["packages"], generated["heuristic_choice"]
    num_medications = knowledge.num_medications
    rows = torch.arange(len(packages), device=packages.device)
    probs = package_probabilities(packages, generated["scores"], choice, num_medications)
    truth = to_multi_hot(batch["package"], num_medications)
    per_group = packages.shape[1] // 3
    candidate = to_multi_hot(packages[rows, generated["candidate_choice"]], num_medications)
    heuristic = to_multi_hot(packages[rows, choice], num_medications)
    f1, candidate_f1 = set_f1(heuristic, truth).tolist(), set_f1(candidate, truth).tolist()
    recorded = [drugs.nonzero().flatten().tolist() for drugs in truth.cpu()]
    codes = knowledge.vocab["medication"]
    records = []
    for n, (b, t) in enumerate(batch["visit_mask"].nonzero().tolist()):
        records.append(
            {
                **visit_ids(batch, b, t),
                **visit_record(probs[n].float().cpu(), 0.5, knowledge, recorded=recorded[n]),
                "source": ("S1", "S2", "S3")[int(choice[n]) // per_group],
                "f1": round(f1[n], 4),
                "candidate_drugs": [codes[d] for d in candidate[n].nonzero().flatten().tolist()],
                "candidate_f1": round(candidate_f1[n], 4),
            }
        )
    return records
