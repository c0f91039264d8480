"""MiranDa's estimated length of stay (ELOS): the counterfactual outcome of a recommended drug set.

For a visit and a drug set, MiranDa (Wang et al. 2024, §2.3) retrieves

* ``retrieve_p``: the training visits with the same procedure set and an age within ±n years
  (n = 5);
* ``retrieve_d``: of those, the K (= 50) whose drug vectors are most cosine-similar to the
  set, keeping only similarities above φ;

and ELOS is the mean length of stay of ``retrieve_d``. The authors query SQLite per visit;
:class:`StayIndex` is built once from the training split instead — rows grouped by procedure
set and sorted by age, drug vectors in one tensor — so a whole batch is answered with a few
tensor operations: a hash lookup of each visit's procedure set (``searchsorted`` over the
sorted group hashes, verified code by code), an age window per visit (``searchsorted`` in its
group), one gather + batched matrix product for the similarities, and two stable sorts.

Conventions this implementation fixes where the paper is silent:

* ties in similarity go to the neighbour closest in age, then to the earlier row of the index;
* when no neighbour passes φ, ELOS falls back to the single most similar one (as the authors'
  code does), so an unusual prediction cannot escape the estimate;
* a visit whose procedure set or age window holds no training visit has no ELOS (NaN);
* a training visit never retrieves itself (``exclude``; the authors' query does the same).

:meth:`StayIndex.soft_elos` is the differentiable relaxation MiranDa's perturbation needs:
the same candidates, weighted by a softmax of their cosine similarity with the predicted
probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from datamodules.knowledge import TrainingStays

__all__ = ["ELOSMetric", "Retrieval", "StayIndex"]

_HASH_BITS = 62
_AGE_SLACK = 1e-3  # the searchsorted window is widened by this, then cut exactly in float32
_GATHER_BUDGET = 1 << 22  # elements of one gathered (chunk, window, drugs) block


@dataclass
class Retrieval:
    """The answer for Q query visits.

    ``candidates`` (Q, W) index rows of ``retrieve_p`` (``valid`` marks real ones);
    ``neighbours`` (Q, K) the rows of ``retrieve_d`` in rank order, -1 padded; ``elos`` (Q,)
    their mean length of stay, NaN without candidates.
    """

    candidates: Tensor
    valid: Tensor
    neighbours: Tensor
    elos: Tensor

    @property
    def defined(self) -> Tensor:
        return ~torch.isnan(self.elos)


class StayIndex:
    """ELOS retrieval index over training visits (MiranDa §2.3, ``retrieve_p`` / ``retrieve_d``).

    Args:
        procedures: per visit, its procedure indices (duplicates allowed).
        ages, stays: per visit, age in years and length of stay in days; visits where either
            is NaN are left out.
        drugs: per visit, its medication indices.
        num_procedures, num_medications: vocabulary sizes.
        keys: per visit, an identifier (e.g. ``(patient_index, visit_number)``) for
            :meth:`rows_of`, which the caller uses to keep a visit from retrieving itself.
        age_window: n, the ± years of ``retrieve_p``.
        top_k: K, the size of ``retrieve_d``.
        min_similarity: φ, the cosine similarity a neighbour must exceed.
    """

    def __init__(
        self,
        procedures: Sequence[Sequence[int]],
        ages: Sequence[float],
        stays: Sequence[float],
        drugs: Sequence[Sequence[int]],
        num_procedures: int,
        num_medications: int,
        keys: Sequence[tuple[int, int]] | None = None,
        age_window: float = 5.0,
        top_k: int = 50,
        min_similarity: float = 0.35,
        seed: int = 0,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if age_window < 0:
            raise ValueError(f"age_window must be >= 0, got {age_window}")
        self.age_window, self.top_k, self.min_similarity = float(age_window), int(top_k), float(min_similarity)
        self.num_procedures, self.num_medications = int(num_procedures), int(num_medications)
        ages = np.asarray(ages, dtype=np.float32)
        stays = np.asarray(stays, dtype=np.float32)
        keep = np.flatnonzero(~np.isnan(ages) & ~np.isnan(stays))
        sets = [tuple(sorted({int(c) for c in procedures[i]})) for i in keep]

        # One random 62-bit code per procedure; a set hashes to the (wrapping) sum of its codes.
        # Redrawn in the unlikely case two distinct training sets collide, so lookups are exact.
        distinct = sorted(set(sets))
        width = max([len(s) for s in distinct] + [1])
        canon = np.full((max(len(distinct), 1), width), self.num_procedures, dtype=np.int64)
        for g, s in enumerate(distinct):
            canon[g, : len(s)] = s
        rng = np.random.default_rng(seed)
        while True:
            codes = rng.integers(1, 1 << _HASH_BITS, size=self.num_procedures + 1, dtype=np.int64)
            codes[-1] = 0  # padding slot
            hashes = codes[canon].sum(1) if distinct else np.zeros(0, np.int64)
            if len(np.unique(hashes)) == len(hashes):
                break
        by_hash = np.argsort(hashes, kind="stable")
        group_of_set = {distinct[g]: rank for rank, g in enumerate(by_hash)}
        self.code_hash = torch.from_numpy(codes)
        self.group_hash = torch.from_numpy(hashes[by_hash])
        self.group_codes = torch.from_numpy(canon[by_hash] if distinct else canon[:0])

        # Rows sorted by (group, age, input order).
        group = np.array([group_of_set[s] for s in sets], dtype=np.int64)
        order = np.lexsort((np.arange(len(keep)), ages[keep], group))
        rows = keep[order]
        self.group = torch.from_numpy(group[order])
        self.ages = torch.from_numpy(ages[rows])
        self.stays = torch.from_numpy(stays[rows])
        n_groups = len(distinct)
        counts = np.bincount(group, minlength=n_groups)
        self.group_end = torch.from_numpy(np.cumsum(counts).astype(np.int64))
        self.group_start = self.group_end - torch.from_numpy(counts.astype(np.int64))
        self.age_min = float(ages[keep].min()) if len(keep) else 0.0
        self.span = (float(ages[keep].max()) - self.age_min if len(keep) else 0.0) + 2 * self.age_window + 2.0
        self.sort_keys = self.group.double() * self.span + (self.ages.double() - self.age_min)

        drug_lists = [np.asarray(drugs[i], dtype=np.int64) for i in rows]
        drug_matrix = np.zeros((len(rows), self.num_medications), dtype=np.float32)
        if drug_lists:
            drug_matrix[np.repeat(np.arange(len(rows)), [len(d) for d in drug_lists]), np.concatenate(drug_lists)] = 1.0
        drug_matrix = torch.from_numpy(drug_matrix)
        self.drugs = drug_matrix
        self.drug_norms = drug_matrix.sum(1).sqrt()
        self.source_rows = torch.from_numpy(rows.astype(np.int64))  # input position of each row
        self._row_of_key: dict[tuple[int, int], int] = {}
        if keys is not None:
            self._row_of_key = {tuple(keys[i]): r for r, i in enumerate(rows)}
        self._row_table: Tensor | None = None

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_stays(cls, stays: TrainingStays, num_procedures: int, num_medications: int, **kwargs) -> StayIndex:
        """From the knowledge's ``TrainingStays`` (the training split's visits with an age and a stay)."""
        keys = [tuple(key) for key in stays.keys.tolist()]
        return cls(
            stays.procedures, stays.ages, stays.stays, stays.drugs, num_procedures, num_medications, keys=keys, **kwargs
        )

    @classmethod
    def from_sequences(cls, dataset, num_procedures: int, num_medications: int, **kwargs) -> StayIndex:
        """From a :class:`datamodules.visit_sequence.PatientSequences` (the training split)."""
        return cls.from_stays(TrainingStays.from_sequences(dataset), num_procedures, num_medications, **kwargs)

    def __len__(self) -> int:
        return len(self.stays)

    @property
    def device(self) -> torch.device:
        return self.drugs.device

    def to(self, device: torch.device | str) -> StayIndex:
        """Moves the tensors (in place) and returns the index."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        return self

    def rows_of(self, keys: Tensor) -> Tensor:
        """(Q, 2) ``(patient_index, visit_number)`` keys -> index rows (-1 where not indexed)."""
        if self._row_table is None or self._row_table.device != keys.device:
            n_patients = 1 + max((k[0] for k in self._row_of_key), default=-1)
            n_visits = 1 + max((k[1] for k in self._row_of_key), default=-1)
            table = torch.full((max(n_patients, 1), max(n_visits, 1)), -1, dtype=torch.long)
            for (p, t), r in self._row_of_key.items():
                table[p, t] = r
            self._row_table = table.to(keys.device)
        table = self._row_table
        inside = (keys[:, 0] < table.shape[0]) & (keys[:, 1] < table.shape[1]) & (keys >= 0).all(1)
        rows = torch.full((len(keys),), -1, dtype=torch.long, device=keys.device)
        hit = keys[inside]
        rows[inside] = table[hit[:, 0], hit[:, 1]]
        return rows

    # --- retrieve_p ----------------------------------------------------------------------
    def groups_of(self, procedures: Tensor, mask: Tensor) -> Tensor:
        """(Q, L) padded procedure codes + mask -> group id (Q,), -1 for a set unseen in training."""
        sentinel = self.num_procedures
        codes = torch.where(mask, procedures, torch.full_like(procedures, sentinel)).sort(-1).values
        repeated = torch.zeros_like(codes, dtype=torch.bool)
        repeated[:, 1:] = codes[:, 1:] == codes[:, :-1]
        codes = torch.where(repeated, torch.full_like(codes, sentinel), codes).sort(-1).values
        hashes = self.code_hash[codes].sum(-1)
        n_groups = len(self.group_hash)
        if n_groups == 0:
            return torch.full_like(hashes, -1)
        group = torch.searchsorted(self.group_hash, hashes).clamp(max=n_groups - 1)
        width = max(codes.shape[1], self.group_codes.shape[1])
        query = _pad_codes(codes, width, sentinel)
        stored = _pad_codes(self.group_codes[group], width, sentinel)
        same = (self.group_hash[group] == hashes) & (query == stored).all(-1)
        return torch.where(same, group, torch.full_like(group, -1))

    def candidates(self, groups: Tensor, ages: Tensor, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``retrieve_p``: rows (Q, W) of the same group with |age - a| <= n, and their mask."""
        n = self.age_window
        known = (groups >= 0) & ~torch.isnan(ages)
        g = groups.clamp(min=0)
        base = g.double() * self.span + (ages.double() - self.age_min)
        lo = torch.searchsorted(self.sort_keys, base - n - _AGE_SLACK)
        hi = torch.searchsorted(self.sort_keys, base + n + _AGE_SLACK, right=True)
        if len(self.group_start):
            lo = torch.maximum(lo, self.group_start[g])
            hi = torch.minimum(hi, self.group_end[g])
        hi = torch.where(known, torch.maximum(hi, lo), lo)
        width = int((hi - lo).max()) if len(lo) else 0
        offsets = torch.arange(max(width, 1), device=groups.device)
        rows = lo[:, None] + offsets[None, :]
        valid = offsets[None, :] < (hi - lo)[:, None]
        rows = torch.where(valid, rows, torch.zeros_like(rows)).clamp(max=max(len(self) - 1, 0))
        if len(self) == 0:
            return rows, torch.zeros_like(valid)
        valid &= (self.ages[rows] - ages.to(self.ages.dtype)[:, None]).abs() <= n
        if exclude is not None:
            valid &= rows != exclude[:, None]
        return rows, valid

    # --- retrieve_d ----------------------------------------------------------------------
    def similarities(self, drug_sets: Tensor, rows: Tensor, valid: Tensor) -> Tensor:
        """Cosine similarity (Q, W) of each query's drug vector with its candidates' (0 if either is empty).

        Works for 0/1 sets and for probabilities alike, and is differentiable in ``drug_sets``.
        """
        width = rows.shape[1]
        chunk = max(1, _GATHER_BUDGET // max(1, width * self.num_medications))
        dots = []
        for start in range(0, len(rows), chunk):
            block = self.drugs[rows[start : start + chunk]]  # (c, W, M)
            dots.append(torch.bmm(block, drug_sets[start : start + chunk, :, None].to(block.dtype)).squeeze(-1))
        dot = torch.cat(dots) if dots else drug_sets.new_zeros(0, width)
        norm = drug_sets.norm(dim=-1, keepdim=True) * self.drug_norms[rows]
        positive = valid & (norm > 0)
        return torch.where(positive, dot / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(dot))

    def rank(self, similarity: Tensor, rows: Tensor, valid: Tensor, ages: Tensor) -> tuple[Tensor, Tensor]:
        """Candidates ordered by similarity, then closeness in age, then row: (order (Q, W), sorted sims)."""
        gap = (self.ages[rows] - ages.to(self.ages.dtype)[:, None]).abs().masked_fill(~valid, float("inf"))
        by_age = gap.sort(dim=-1, stable=True).indices  # rows within a window ascend already
        sim = similarity.detach().masked_fill(~valid, float("-inf")).gather(-1, by_age)
        by_sim = sim.sort(dim=-1, descending=True, stable=True)
        return by_age.gather(-1, by_sim.indices), by_sim.values

    def retrieve(
        self,
        drug_sets: Tensor,
        procedures: Tensor,
        procedures_mask: Tensor,
        ages: Tensor,
        exclude: Tensor | None = None,
    ) -> Retrieval:
        """ELOS of Q query visits: ``drug_sets`` (Q, M) 0/1, procedures (Q, L) + mask, ages (Q,).

        ``exclude`` (Q,) holds an index row each query must not retrieve (-1 for none).
        """
        drug_sets = drug_sets.detach().to(self.drugs.dtype)
        rows, valid = self.candidates(self.groups_of(procedures, procedures_mask), ages, exclude)
        if len(self) == 0:  # no training visit has both age and length of stay
            nan = torch.full((len(rows),), float("nan"), device=rows.device)
            return Retrieval(rows, valid, torch.full_like(rows, -1), nan)
        sim = self.similarities(drug_sets, rows, valid)
        order, ranked = self.rank(sim, rows, valid, ages)
        k = min(self.top_k, rows.shape[1])
        ranked, order = ranked[:, :k], order[:, :k]
        available = torch.isfinite(ranked)
        passing = (available & (ranked > self.min_similarity)).sum(-1)
        # fewer than one passing neighbour: fall back to the most similar one
        use = torch.where(available.any(-1), passing.clamp(min=1), torch.zeros_like(passing))
        chosen = torch.arange(k, device=rows.device)[None, :] < use[:, None]
        neighbours = torch.where(chosen, rows.gather(-1, order), torch.full_like(order, -1))
        stays = torch.where(chosen, self.stays[neighbours.clamp(min=0)], torch.zeros_like(ranked))
        elos = stays.sum(-1) / use.clamp(min=1).to(stays.dtype)
        elos = torch.where(use > 0, elos, torch.full_like(elos, float("nan")))
        return Retrieval(candidates=rows, valid=valid, neighbours=neighbours, elos=elos)

    def soft_elos(self, probabilities: Tensor, retrieval: Retrieval, temperature: float = 0.1) -> Tensor:
        """Differentiable ELOS (Q,): candidates weighted by softmax(cos(probabilities, drugs) / temperature).

        NaN where ``retrieve_p`` is empty. Lowering it moves the predicted probabilities towards
        the drug sets of candidates who stayed shorter.
        """
        if len(self) == 0:
            return probabilities.new_full((len(probabilities),), float("nan"))
        sim = self.similarities(probabilities, retrieval.candidates, retrieval.valid)
        logits = (sim / temperature).masked_fill(~retrieval.valid, float("-inf"))
        has = retrieval.valid.any(-1, keepdim=True)
        weights = torch.where(has, logits, torch.zeros_like(logits)).softmax(-1)
        stays = self.stays[retrieval.candidates].to(weights.dtype)
        soft = (weights * torch.where(retrieval.valid, stays, torch.zeros_like(stays))).sum(-1)
        return torch.where(has.squeeze(-1), soft, torch.full_like(soft, float("nan")))


def _pad_codes(codes: Tensor, width: int, sentinel: int) -> Tensor:
    if codes.shape[1] >= width:
        return codes[:, :width]
    pad = torch.full((codes.shape[0], width - codes.shape[1]), sentinel, dtype=codes.dtype, device=codes.device)
    return torch.cat([codes, pad], dim=1)


class ELOSMetric(Metric):
    """Mean ELOS of the recommended drug sets (MiranDa Table 2) with the real mean LOS of the same visits.

    ``update(elos, los)`` takes one value per visit (NaN where ELOS is undefined or LOS
    unknown). ``compute`` returns ``{"elos", "los", "coverage"}``: mean ELOS and mean real LOS
    over visits that have both, and the share of visits with a known LOS that got an ELOS.
    States are sums, so the figures are the same on one process or several DDP ranks.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    elos_sum: Tensor
    los_sum: Tensor
    covered: Tensor
    visits: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("elos_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("los_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("covered", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("visits", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, elos: Tensor, los: Tensor) -> None:
        if elos.shape != los.shape:
            raise ValueError(f"`elos` {tuple(elos.shape)} and `los` {tuple(los.shape)} differ")
        known = ~torch.isnan(los)
        both = known & ~torch.isnan(elos)
        self.elos_sum += elos[both].double().sum()
        self.los_sum += los[both].double().sum()
        self.covered += both.sum()
        self.visits += known.sum()

    def compute(self) -> dict[str, Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.elos_sum.device)
        covered = self.covered.to(torch.float64)
        return {
            "elos": self.elos_sum / covered if self.covered > 0 else nan,
            "los": self.los_sum / covered if self.covered > 0 else nan,
            "coverage": covered / self.visits if self.visits > 0 else nan,
        }
