"""Evaluation metrics for medication-combination recommendation.

Every definition follows the SafeDrug reference code (``util.py``:
``multi_label_metric`` and ``ddi_rate_score``):

* per-visit scores (Jaccard, precision, recall, F1, PR-AUC, ROC-AUC) are
  averaged over the visits of a patient first and then over patients, so a
  patient with many visits weighs as much as a patient with one;
* the DDI rate and the average number of predicted drugs are global ratios
  over all real visits.

Conventions for a batch of ``B`` patients with at most ``T`` visits and ``M``
drugs:

* ``probs``: float tensor ``(B, T, M)`` of predicted drug probabilities;
* ``target``: 0/1 tensor ``(B, T, M)``, the true drug set of every visit;
* ``visit_mask``: bool tensor ``(B, T)``, ``True`` for real visits and
  ``False`` for padding.

The predicted drug set of a visit is ``{m : probs[..., m] >= threshold}``.

All metric states are sums or concatenations, so the results are the same
whether the data are seen in one process or spread over several DDP ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from lightning_modules.precision import float32

__all__ = [
    "SCORE_NAMES",
    "SUMMARY_KEYS",
    "AverageDrugCount",
    "DDIRate",
    "F1",
    "Jaccard",
    "PRAUC",
    "PatientAveragedMetric",
    "PatientMetricTable",
    "Precision",
    "ROCAUC",
    "Recall",
    "bootstrap",
    "patient_means",
    "recommendation_metrics",
    "summarize",
    "visit_scores",
]

SCORE_NAMES: tuple[str, ...] = ("jaccard", "precision", "recall", "f1", "prauc", "rocauc")
COUNT_NAMES: tuple[str, ...] = ("ddi_pairs", "all_pairs", "drugs", "visits")
SUMMARY_KEYS: tuple[str, ...] = (*SCORE_NAMES, "ddi_rate", "avg_drugs")


# ---------------------------------------------------------------------------
# functional core
# ---------------------------------------------------------------------------
def _check_inputs(probs: Tensor, visit_mask: Tensor, target: Tensor | None = None) -> None:
    if probs.dim() != 3:
        raise ValueError(f"`probs` must have shape (B, T, M), got {tuple(probs.shape)}")
    if target is not None and target.shape != probs.shape:
        raise ValueError(
            f"`target` must have the same shape as `probs` {tuple(probs.shape)}, got {tuple(target.shape)}"
        )
    if visit_mask.shape != probs.shape[:2]:
        raise ValueError(f"`visit_mask` must have shape {tuple(probs.shape[:2])}, got {tuple(visit_mask.shape)}")


def _float_dtype(probs: Tensor) -> torch.dtype:
    # half-precision probabilities would make ratios such as 1/3 visibly inexact
    return torch.promote_types(probs.dtype, torch.float32) if probs.is_floating_point() else torch.float32


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 wherever ``den == 0`` (SafeDrug's convention for empty sets)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def _ranking_scores(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Average precision and ROC-AUC of every row of ``scores`` (N, M), ties included.

    Both quantities only depend, for every drug, on how many drugs score
    strictly lower and how many score lower-or-equal, which two
    ``searchsorted`` calls on the sorted row give at once for all rows. This
    reproduces sklearn's tie handling exactly: ``average_precision_score`` puts
    a single threshold at each distinct score (a positive inside a tie group
    gets the precision at the end of the group), and ``roc_auc_score`` is the
    Mann-Whitney statistic with average ranks.
    """
    n_drugs = scores.shape[-1]
    dtype = _float_dtype(scores)
    scores = scores.contiguous()
    labels = labels.long()
    sorted_scores, order = scores.sort(dim=-1)
    sorted_labels = labels.gather(-1, order)
    # clamping only matters for NaN scores, which would otherwise index past the row
    n_lower = torch.searchsorted(sorted_scores, scores, right=False).clamp(max=n_drugs - 1)
    n_lower_equal = torch.searchsorted(sorted_scores, scores, right=True)

    n_pos = labels.sum(-1)
    n_neg = n_drugs - n_pos

    # positives scoring >= s_i and drugs scoring >= s_i, i.e. tp and tp+fp at the
    # threshold s_i (the end of the tie group of drug i)
    pos_from = sorted_labels.flip(-1).cumsum(-1).flip(-1)
    tp_at = pos_from.gather(-1, n_lower).to(dtype)
    predicted_at = (n_drugs - n_lower).to(dtype)
    precision_at = tp_at / predicted_at
    ap = _safe_div((precision_at * labels.to(dtype)).sum(-1), n_pos.to(dtype))

    # twice the 1-based average rank keeps the rank sum in exact integers
    twice_rank = n_lower + n_lower_equal + 1
    twice_rank_sum = (twice_rank * labels).sum(-1)
    u_twice = (twice_rank_sum - n_pos * (n_pos + 1)).to(dtype)
    auc_den = (2 * n_pos * n_neg).to(dtype)
    # auc_den is an integer count, so clamping it to 1 only touches the undefined rows
    auc = torch.where(auc_den > 0, u_twice / auc_den.clamp(min=1), torch.full_like(u_twice, math.nan))
    return ap, auc


def visit_scores(probs: Tensor, target: Tensor, visit_mask: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """Per-visit scores of the SafeDrug reference definition, for all visits at once.

    Returns a dict with keys ``jaccard``, ``precision``, ``recall``, ``f1``,
    ``prauc`` and ``rocauc``, each of shape ``(B, T)``. Entries of padding
    visits are meaningless. ``rocauc`` is NaN for visits whose true set is
    empty or holds every drug (ROC-AUC is undefined there); ``prauc`` is 0 for
    visits without a true drug.
    """
    _check_inputs(probs, visit_mask, target)
    batch, visits, n_drugs = probs.shape
    dtype = _float_dtype(probs)
    truth = target != 0
    pred = probs >= threshold

    inter = (truth & pred).sum(-1).to(dtype)
    union = (truth | pred).sum(-1).to(dtype)
    n_pred = pred.sum(-1).to(dtype)
    n_true = truth.sum(-1).to(dtype)

    jaccard = _safe_div(inter, union)
    precision = _safe_div(inter, n_pred)
    recall = _safe_div(inter, n_true)
    f1 = _safe_div(2 * precision * recall, precision + recall)

    flat_scores = probs.reshape(batch * visits, n_drugs)
    if flat_scores.dtype != dtype:
        flat_scores = flat_scores.to(dtype)
    ap, auc = _ranking_scores(flat_scores, truth.reshape(batch * visits, n_drugs))
    return {
        "jaccard": jaccard,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "prauc": ap.reshape(batch, visits),
        "rocauc": auc.reshape(batch, visits),
    }


def patient_means(scores: Tensor, visit_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``scores`` (B, T) over the real, non-NaN visits of each patient.

    Returns ``(means, valid)``: ``valid[b]`` is False when patient ``b`` has no
    real visit with a defined score, and ``means[b]`` is NaN there.
    """
    if scores.shape != visit_mask.shape:
        raise ValueError(f"`scores` {tuple(scores.shape)} and `visit_mask` {tuple(visit_mask.shape)} differ")
    usable = visit_mask.bool() & ~torch.isnan(scores)
    total = torch.where(usable, scores, torch.zeros_like(scores)).sum(-1)
    count = usable.sum(-1)
    valid = count > 0
    means = torch.where(valid, total / count.clamp(min=1).to(total.dtype), torch.full_like(total, math.nan))
    return means, valid


def _predicted_sets(probs: Tensor, visit_mask: Tensor, threshold: float) -> Tensor:
    """Bool (B, T, M) predicted drug sets, empty for padding visits."""
    return (probs >= threshold) & visit_mask.bool().unsqueeze(-1)


def _symmetric_adjacency(ddi_adj: Tensor) -> Tensor:
    # a tensor stays where it is (torch.as_tensor would move it to a default device set by the caller)
    adj = ddi_adj if torch.is_tensor(ddi_adj) else torch.as_tensor(ddi_adj)
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"`ddi_adj` must be a square (M, M) matrix, got {tuple(adj.shape)}")
    # SafeDrug counts a pair if either A[i, j] or A[j, i] is set, and never a drug with itself
    sym = (adj != 0) | (adj != 0).T
    sym.fill_diagonal_(False)
    return sym.float()


def _visit_pair_counts(pred: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
    """Per-visit (...,) counts of interacting and of all unordered pairs of the bool (..., M)
    predicted sets; ``adj`` as ``_symmetric_adjacency`` makes it."""
    if pred.shape[-1] != adj.shape[0]:
        raise ValueError(f"`probs` has {pred.shape[-1]} drugs but `ddi_adj` has {adj.shape[0]}")
    pred_f = pred.to(adj.dtype)
    n_pred = pred.sum(-1).long()
    # x^T A x counts every interacting pair twice since A is symmetric with a zero diagonal;
    # per-visit values are small integers, hence exact in float before rounding
    ordered = ((pred_f @ adj) * pred_f).sum(-1).round().long()
    return ordered // 2, n_pred * (n_pred - 1) // 2


def _pair_counts(pred: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patient (B,) counts of interacting and of all unordered predicted drug pairs."""
    ddi_pairs, all_pairs = _visit_pair_counts(pred, adj)
    return ddi_pairs.sum(-1), all_pairs.sum(-1)


def visit_ddi_counts(probs: Tensor, ddi_adj: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """(interacting, all) unordered pairs of each visit's thresholded drug set, (..., M) -> (...,):
    the per-visit DDI rates MoleRec's weight annealing reads, counted as the DDI-rate metric counts."""
    with float32(probs):
        return _visit_pair_counts(probs.float() >= threshold, _symmetric_adjacency(ddi_adj).to(probs.device))


def batch_pair_counts(
    probs: Tensor, visit_mask: Tensor, ddi_adj: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(interacting, all) unordered pairs of the thresholded drug sets of a batch's real visits.

    Their ratio is the batch DDI rate the training-time controllers (SafeDrug's PID β, GAMENet's
    annealing switch) compare with their target, counted exactly as the DDI-rate metric counts
    (``_symmetric_adjacency``); the counts, not the rate, are what is summed over DDP ranks.
    """
    with float32(probs):  # per-visit counts exceed what bfloat16 holds exactly
        pred = _predicted_sets(probs.float(), visit_mask, threshold)
        ddi_pairs, all_pairs = _pair_counts(pred, _symmetric_adjacency(ddi_adj).to(probs.device))
    return ddi_pairs.sum().float(), all_pairs.sum().float()


# ---------------------------------------------------------------------------
# torchmetrics wrappers
# ---------------------------------------------------------------------------
class PatientAveragedMetric(Metric):
    """Per-visit score averaged over each patient's visits, then over patients.

    This is the SafeDrug reference protocol (``multi_label_metric`` is applied
    to all visits of one patient and the resulting means are averaged over
    patients). Subclasses choose the per-visit score through ``score``.
    Patients without a visit where the score is defined (only possible for
    ROC-AUC) are left out. ``compute`` returns NaN when no patient counted.
    """

    score: str = ""
    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    total: Tensor
    count: Tensor

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.score not in SCORE_NAMES:
            raise TypeError(f"{type(self).__name__}.score must be one of {SCORE_NAMES}, got {self.score!r}")
        self.threshold = float(threshold)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor, visit_mask: Tensor) -> None:
        scores = visit_scores(probs, target, visit_mask, self.threshold)[self.score]
        means, valid = patient_means(scores, visit_mask)
        self.total += means[valid].sum().to(self.total.dtype)
        self.count += valid.sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(math.nan, device=self.total.device)
        return self.total / self.count


class Jaccard(PatientAveragedMetric):
    """Patient-averaged Jaccard index |Y∩Ŷ|/|Y∪Ŷ| of the predicted drug set (SafeDrug reference)."""

    score = "jaccard"


class Precision(PatientAveragedMetric):
    """Patient-averaged precision |Y∩Ŷ|/|Ŷ|, 0 for an empty prediction (SafeDrug reference)."""

    score = "precision"


class Recall(PatientAveragedMetric):
    """Patient-averaged recall |Y∩Ŷ|/|Y|, 0 for an empty true set (SafeDrug reference)."""

    score = "recall"


class F1(PatientAveragedMetric):
    """Patient-averaged mean of per-visit F1 = 2pr/(p+r) (SafeDrug reference; not F1 of mean p and r)."""

    score = "f1"


class PRAUC(PatientAveragedMetric):
    """Patient-averaged per-visit average precision of the ranked drug list (SafeDrug reference).

    Equal to ``sklearn.metrics.average_precision_score`` on each visit, ties
    included; 0 for a visit without true drugs.
    """

    score = "prauc"


class ROCAUC(PatientAveragedMetric):
    """Patient-averaged per-visit ROC-AUC of the drug probabilities (SafeDrug reference).

    Equal to ``sklearn.metrics.roc_auc_score`` on each visit, ties included.
    Visits whose true set is empty or complete have no ROC-AUC and are skipped.
    """

    score = "rocauc"


class DDIRate(Metric):
    """Share of predicted drug pairs that interact, over all real visits (SafeDrug ``ddi_rate_score``).

    For every real visit the unordered pairs of predicted drugs are counted,
    together with those marked in the DDI adjacency; the rate is the global
    ratio of the two sums (0 when no pair was predicted). The adjacency is
    symmetrised and its diagonal ignored, as in the reference code.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    ddi_adj: Tensor
    ddi_pairs: Tensor
    all_pairs: Tensor

    def __init__(self, ddi_adj: Tensor, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        # non-persistent: the graph belongs to the data set, not to checkpoints
        self.register_buffer("ddi_adj", _symmetric_adjacency(ddi_adj), persistent=False)
        self.add_state("ddi_pairs", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("all_pairs", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, visit_mask: Tensor) -> None:
        _check_inputs(probs, visit_mask)
        pred = _predicted_sets(probs, visit_mask, self.threshold)
        ddi_pairs, all_pairs = _pair_counts(pred, self.ddi_adj)
        self.ddi_pairs += ddi_pairs.sum()
        self.all_pairs += all_pairs.sum()

    def compute(self) -> Tensor:
        return _safe_div(self.ddi_pairs.float(), self.all_pairs.float())


class AverageDrugCount(Metric):
    """Mean number of predicted drugs per real visit (SafeDrug reference "avg. # of drugs")."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    drugs: Tensor
    visits: Tensor

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("drugs", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("visits", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, visit_mask: Tensor) -> None:
        _check_inputs(probs, visit_mask)
        self.drugs += _predicted_sets(probs, visit_mask, self.threshold).sum()
        self.visits += visit_mask.bool().sum()

    def compute(self) -> Tensor:
        return _safe_div(self.drugs.float(), self.visits.float())


class PatientMetricTable(Metric):
    """Per-patient rows of every SafeDrug reference metric, for final tests and bootstrapping.

    Each patient with at least one real visit contributes one row: its
    visit-averaged ``jaccard``, ``precision``, ``recall``, ``f1``, ``prauc``
    and ``rocauc`` (NaN if no visit has a defined ROC-AUC), and its counts
    ``ddi_pairs``, ``all_pairs``, ``drugs`` and ``visits``. ``compute``
    returns the concatenated columns; feed them to :func:`summarize` or
    :func:`bootstrap`. Rows are gathered with ``cat`` under DDP, so their
    order follows the ranks, not the data set. torchmetrics squeezes
    one-element results, so a table of a single patient holds 0-d tensors;
    :func:`summarize` and :func:`bootstrap` accept either.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    ddi_adj: Tensor

    def __init__(self, ddi_adj: Tensor, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.register_buffer("ddi_adj", _symmetric_adjacency(ddi_adj), persistent=False)
        for name in (*SCORE_NAMES, *COUNT_NAMES):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor, visit_mask: Tensor) -> None:
        scores = visit_scores(probs, target, visit_mask, self.threshold)
        has_visit = visit_mask.bool().any(-1)
        for name in SCORE_NAMES:
            means, _ = patient_means(scores[name], visit_mask)
            getattr(self, name).append(means[has_visit])
        pred = _predicted_sets(probs, visit_mask, self.threshold)
        ddi_pairs, all_pairs = _pair_counts(pred, self.ddi_adj)
        counts = {
            "ddi_pairs": ddi_pairs,
            "all_pairs": all_pairs,
            "drugs": pred.sum((-1, -2)),
            "visits": visit_mask.bool().sum(-1),
        }
        for name, value in counts.items():
            getattr(self, name).append(value.long()[has_visit])

    def compute(self) -> dict[str, Tensor]:
        table = {}
        for name in (*SCORE_NAMES, *COUNT_NAMES):
            rows = getattr(self, name)
            if isinstance(rows, Tensor):
                table[name] = rows
            elif rows:
                table[name] = dim_zero_cat(rows)
            else:
                dtype = torch.float32 if name in SCORE_NAMES else torch.long
                table[name] = torch.zeros(0, dtype=dtype, device=self.device)
        return table


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------
def _as_numpy(table: dict[str, Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for name in (*SCORE_NAMES, *COUNT_NAMES):
        if name not in table:
            raise KeyError(f"table lacks column {name!r}")
        value = table[name]
        value = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        out[name] = value.astype(np.float64).reshape(-1)
    return out


def _summarize_np(table: dict[str, np.ndarray]) -> dict[str, float]:
    result = {}
    for name in SCORE_NAMES:
        column = table[name]
        if name == "rocauc":
            defined = column[~np.isnan(column)]
            result[name] = float(defined.mean()) if defined.size else math.nan
        else:
            result[name] = float(column.mean()) if column.size else math.nan
    all_pairs = table["all_pairs"].sum()
    visits = table["visits"].sum()
    result["ddi_rate"] = float(table["ddi_pairs"].sum() / all_pairs) if all_pairs > 0 else 0.0
    result["avg_drugs"] = float(table["drugs"].sum() / visits) if visits > 0 else 0.0
    return result


def summarize(table: dict[str, Tensor]) -> dict[str, float]:
    """Figures of a :class:`PatientMetricTable` without bootstrapping.

    Score columns are averaged over patients (``rocauc`` ignores NaN rows);
    ``ddi_rate`` and ``avg_drugs`` are global ratios of the summed counts, as
    in SafeDrug's ``ddi_rate_score``.
    """
    return _summarize_np(_as_numpy(table))


def bootstrap(table: dict[str, Tensor], rounds: int = 10, fraction: float = 0.8, seed: int = 0) -> dict[str, float]:
    """SafeDrug's test protocol: ``rounds`` resamples of ``round(n * fraction)`` patients with replacement.

    Each resample is passed to :func:`summarize`; the result holds, for every
    key of :data:`SUMMARY_KEYS`, the mean over rounds and ``<key>_std``
    (``np.std``, population standard deviation as in the reference code).
    Sampling uses ``numpy.random.Generator(seed)``, so equal seeds give equal
    results.
    """
    data = _as_numpy(table)
    n_patients = len(data["jaccard"])
    if n_patients == 0:
        raise ValueError("cannot bootstrap an empty table")
    if rounds < 1 or fraction <= 0:
        raise ValueError(f"need rounds >= 1 and fraction > 0, got rounds={rounds}, fraction={fraction}")
    sample_size = max(1, round(n_patients * fraction))
    rng = np.random.default_rng(seed)
    per_round: dict[str, list[float]] = {key: [] for key in SUMMARY_KEYS}
    for _ in range(rounds):
        index = rng.choice(n_patients, size=sample_size, replace=True)
        figures = _summarize_np({name: column[index] for name, column in data.items()})
        for key in SUMMARY_KEYS:
            per_round[key].append(figures[key])
    result = {}
    for key in SUMMARY_KEYS:
        values = np.asarray(per_round[key])
        result[key] = float(values.mean())
        result[f"{key}_std"] = float(values.std())
    return result


def recommendation_metrics(ddi_adj: Tensor, threshold: float = 0.5, prefix: str = "") -> MetricCollection:
    """All SafeDrug reference metrics in one collection, keyed by :data:`SUMMARY_KEYS` (plus ``prefix``).

    The members take different update arguments, so call the collection with
    keywords: ``metrics.update(probs=p, target=y, visit_mask=m)``; each
    member receives only the arguments its ``update`` accepts.
    """
    metrics = {
        "jaccard": Jaccard(threshold=threshold),
        "precision": Precision(threshold=threshold),
        "recall": Recall(threshold=threshold),
        "f1": F1(threshold=threshold),
        "prauc": PRAUC(threshold=threshold),
        "rocauc": ROCAUC(threshold=threshold),
        "ddi_rate": DDIRate(ddi_adj, threshold=threshold),
        "avg_drugs": AverageDrugCount(threshold=threshold),
    }
    # groups would be merged by equal state, which wrongly merges e.g. precision and recall
    return MetricCollection(metrics, prefix=prefix or None, compute_groups=False)
