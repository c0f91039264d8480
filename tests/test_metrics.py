"""Tests for lightning_modules.metrics against hand-computed values and sklearn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from lightning_modules.metrics import (
    F1,
    PRAUC,
    ROCAUC,
    AverageDrugCount,
    DDIRate,
    Jaccard,
    PatientMetricTable,
    Precision,
    Recall,
    batch_pair_counts,
    bootstrap,
    patient_means,
    recommendation_metrics,
    summarize,
    visit_scores,
)

SCORES = ("jaccard", "precision", "recall", "f1", "prauc", "rocauc")
SUMMARY = (*SCORES, "ddi_rate", "avg_drugs")
COUNTS = ("ddi_pairs", "all_pairs", "drugs", "visits")
NAN = math.nan


# ---------------------------------------------------------------------------
# hand-computed batch: 2 patients, 3 visit slots, 4 drugs
#
# patient A (2 real visits + 1 padding visit)
#   A0 true {0,1}, probs .9 .4 .7 .1  -> pred {0,2}: J 1/3 P 1/2 R 1/2 F1 1/2, AP 5/6, AUC 3/4
#   A1 true {1,3}, probs .6 .6 .2 .6  -> pred {0,1,3}: J 2/3 P 2/3 R 1 F1 4/5,
#      tie group {0,1,3} holds both positives: AP 2/3; AUC (2 * (1/2 + 1)) / 4 = 3/4
#   A2 padding: everything predicted and true, must be ignored
# patient B (3 real visits)
#   B0 true {2}, probs .1 .2 .3 .4    -> pred {} (empty): J P R F1 0, AP 1/2, AUC 2/3
#   B1 true = all drugs, probs .8 .3 .9 .55 -> pred {0,2,3}: J 3/4 P 1 R 3/4 F1 6/7, AP 1,
#      AUC undefined (NaN, excluded)
#   B2 true {0}, probs .5 .5 .05 .5   -> pred {0,1,3} (0.5 >= threshold): J 1/3 P 1/3 R 1 F1 1/2,
#      tie group {0,1,3} with one positive: AP 1/3; AUC (1/2 + 1/2 + 1) / 3 = 2/3
# DDI adjacency: A[0,2] = 1 and A[3,1] = 1 (asymmetric), A[1,1] = 1 (diagonal, ignored)
#   pairs A0 1 (ddi 1), A1 3 (ddi 1: 1-3), B0 0, B1 3 (ddi 1: 0-2), B2 3 (ddi 1: 1-3) -> 4/10
#   drugs 2 + 3 + 0 + 3 + 3 = 11 over 5 real visits
# ---------------------------------------------------------------------------
HAND_VISITS = {
    "jaccard": [[1 / 3, 2 / 3], [0.0, 3 / 4, 1 / 3]],
    "precision": [[1 / 2, 2 / 3], [0.0, 1.0, 1 / 3]],
    "recall": [[1 / 2, 1.0], [0.0, 3 / 4, 1.0]],
    "f1": [[1 / 2, 4 / 5], [0.0, 6 / 7, 1 / 2]],
    "prauc": [[5 / 6, 2 / 3], [1 / 2, 1.0, 1 / 3]],
    "rocauc": [[3 / 4, 3 / 4], [2 / 3, NAN, 2 / 3]],
}
HAND_PATIENTS = {
    "jaccard": [1 / 2, 13 / 36],
    "precision": [7 / 12, 4 / 9],
    "recall": [3 / 4, 7 / 12],
    "f1": [13 / 20, 19 / 42],
    "prauc": [3 / 4, 11 / 18],
    "rocauc": [3 / 4, 2 / 3],
    "ddi_pairs": [2, 2],
    "all_pairs": [4, 6],
    "drugs": [5, 6],
    "visits": [2, 3],
}
HAND_EXPECTED = {
    "jaccard": 31 / 72,
    "precision": 37 / 72,
    "recall": 2 / 3,
    "f1": 463 / 840,
    "prauc": 49 / 72,
    "rocauc": 17 / 24,
    "ddi_rate": 4 / 10,
    "avg_drugs": 11 / 5,
}
SCORE_CLASSES = {
    "jaccard": Jaccard,
    "precision": Precision,
    "recall": Recall,
    "f1": F1,
    "prauc": PRAUC,
    "rocauc": ROCAUC,
}


def hand_batch(padding_probs=0.99, padding_target=1):
    probs = torch.tensor(
        [
            [[0.9, 0.4, 0.7, 0.1], [0.6, 0.6, 0.2, 0.6], [padding_probs] * 4],
            [[0.1, 0.2, 0.3, 0.4], [0.8, 0.3, 0.9, 0.55], [0.5, 0.5, 0.05, 0.5]],
        ]
    )
    target = torch.tensor(
        [
            [[1, 1, 0, 0], [0, 1, 0, 1], [padding_target] * 4],
            [[0, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
        ]
    )
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return probs, target, mask


def hand_adj():
    adj = torch.zeros(4, 4)
    adj[0, 2] = 1
    adj[3, 1] = 1
    adj[1, 1] = 1
    return adj


def compute_all(probs, target, mask, adj, threshold=0.5):
    metrics = recommendation_metrics(adj, threshold=threshold)
    metrics.update(probs=probs, target=target, visit_mask=mask)
    return {key: value.item() for key, value in metrics.compute().items()}


def random_batch(seed, batch=7, visits=5, drugs=10):
    """Random batch with ties, exact-threshold probabilities, empty/full true sets and padding."""
    gen = torch.Generator().manual_seed(seed)
    # one decimal => many ties and many probabilities exactly equal to 0.5
    probs = torch.round(torch.rand(batch, visits, drugs, generator=gen) * 10) / 10
    target = (torch.rand(batch, visits, drugs, generator=gen) < 0.35).long()
    target[0, 0] = 0
    target[1, 0] = 1
    lengths = torch.randint(1, visits + 1, (batch,), generator=gen)
    lengths[0] = visits
    mask = torch.arange(visits).unsqueeze(0) < lengths.unsqueeze(1)
    adj = (torch.rand(drugs, drugs, generator=gen) < 0.3).float()
    return probs, target, mask, adj


def reference_results(probs, target, mask, adj, threshold=0.5):
    """Loop implementation of SafeDrug's multi_label_metric / ddi_rate_score, using sklearn."""
    probs, target, mask, adj = probs.numpy(), target.numpy(), mask.numpy(), adj.numpy()
    per_patient = {name: [] for name in SCORES}
    ddi_count = all_count = drug_count = visit_count = 0
    for b in range(probs.shape[0]):
        rows = {name: [] for name in SCORES}
        for t in range(probs.shape[1]):
            if not mask[b, t]:
                continue
            y, p = target[b, t], probs[b, t]
            truth = set(np.where(y == 1)[0])
            pred = set(np.where(p >= threshold)[0])
            inter, union = len(truth & pred), len(truth | pred)
            jac = inter / union if union else 0.0
            prc = inter / len(pred) if pred else 0.0
            rec = inter / len(truth) if truth else 0.0
            rows["jaccard"].append(jac)
            rows["precision"].append(prc)
            rows["recall"].append(rec)
            rows["f1"].append(2 * prc * rec / (prc + rec) if prc + rec else 0.0)
            rows["prauc"].append(average_precision_score(y, p) if truth else 0.0)
            if 0 < len(truth) < len(y):
                rows["rocauc"].append(roc_auc_score(y, p))
            ordered = sorted(pred)
            for i, med_i in enumerate(ordered):
                for med_j in ordered[i + 1 :]:
                    all_count += 1
                    if adj[med_i, med_j] or adj[med_j, med_i]:
                        ddi_count += 1
            drug_count += len(pred)
            visit_count += 1
        for name in SCORES:
            if rows[name]:
                per_patient[name].append(np.mean(rows[name]))
    result = {name: float(np.mean(values)) for name, values in per_patient.items()}
    result["ddi_rate"] = ddi_count / all_count if all_count else 0.0
    result["avg_drugs"] = drug_count / visit_count
    return result


# ---------------------------------------------------------------------------
# per-visit and per-patient scores
# ---------------------------------------------------------------------------
def test_visit_scores_hand_case():
    probs, target, mask = hand_batch()
    scores = visit_scores(probs, target, mask)
    assert set(scores) == set(SCORES)
    for name in SCORES:
        assert scores[name].shape == (2, 3)
        got_a = scores[name][0, :2].tolist()
        got_b = scores[name][1].tolist()
        np.testing.assert_allclose(got_a, HAND_VISITS[name][0], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got_b, HAND_VISITS[name][1], atol=1e-6, err_msg=name)


def test_patient_means_ignores_padding_and_nan():
    scores = torch.tensor([[0.2, NAN, 0.6, 5.0], [NAN, NAN, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4])
    means, valid = patient_means(scores, mask)
    assert valid.tolist() == [True, False, False]
    assert means[0].item() == pytest.approx(0.4)
    assert math.isnan(means[1].item()) and math.isnan(means[2].item())


@pytest.mark.parametrize("name", SCORES)
def test_patient_averaged_metrics_hand_case(name):
    probs, target, mask = hand_batch()
    metric = SCORE_CLASSES[name]()
    metric.update(probs, target, mask)
    assert metric.compute().item() == pytest.approx(HAND_EXPECTED[name], abs=1e-6)


def test_collection_hand_case_with_prefix():
    probs, target, mask = hand_batch()
    metrics = recommendation_metrics(hand_adj(), prefix="test/")
    metrics.update(probs=probs, target=target, visit_mask=mask)
    values = metrics.compute()
    assert set(values) == {f"test/{key}" for key in SUMMARY}
    for key in SUMMARY:
        assert values[f"test/{key}"].item() == pytest.approx(HAND_EXPECTED[key], abs=1e-6), key


def test_rocauc_excludes_undefined_visits_and_patients():
    # patient 0: one defined visit (AUC 1) and one all-positive visit; patient 1: only an all-negative
    # visit, so it has no ROC-AUC at all and must not count as a patient with AUC 0
    probs = torch.tensor([[[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]], [[0.7, 0.8, 0.9], [0.0, 0.0, 0.0]]])
    target = torch.tensor([[[1, 0, 0], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    metric = ROCAUC()
    metric.update(probs, target, mask)
    assert metric.compute().item() == pytest.approx(1.0)
    assert metric.count.item() == 1

    table = PatientMetricTable(torch.zeros(3, 3))
    table.update(probs, target, mask)
    rocauc = table.compute()["rocauc"]
    assert rocauc[0].item() == pytest.approx(1.0) and math.isnan(rocauc[1].item())
    assert summarize(table.compute())["rocauc"] == pytest.approx(1.0)

    only_undefined = ROCAUC()
    only_undefined.update(probs[1:], target[1:], mask[1:])
    assert math.isnan(only_undefined.compute().item())


def test_patient_average_differs_from_visit_average():
    # patient 0: one perfect visit; patient 1: three visits with Jaccard 0
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.0, 0.0], [0.0, 0.0]],
            [[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]],
        ]
    )
    target = torch.tensor([[[1, 0], [0, 0], [0, 0]], [[0, 1], [0, 1], [0, 1]]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    metric = Jaccard()
    metric.update(probs, target, mask)
    # per-patient means 1 and 0 -> 1/2; averaging the four visits would give 1/4
    assert metric.compute().item() == pytest.approx(0.5)


def test_prauc_and_rocauc_ties():
    # all four drugs tied: sklearn gives AP = prevalence and AUC = 1/2
    probs = torch.tensor([[[0.3, 0.3, 0.3, 0.3], [0.8, 0.2, 0.8, 0.2]]])
    target = torch.tensor([[[1, 0, 0, 0], [1, 0, 0, 1]]])
    mask = torch.tensor([[True, True]])
    scores = visit_scores(probs, target, mask)
    # visit 1: tie {0,2} holds one positive (precision 1/2), tie {1,3} ends at precision 2/4
    assert scores["prauc"][0].tolist() == pytest.approx([1 / 4, 1 / 2])
    # visit 1: pos 0.8 vs neg 0.8 (1/2), 0.2 (1); pos 0.2 vs neg 0.8 (0), 0.2 (1/2)
    assert scores["rocauc"][0].tolist() == pytest.approx([1 / 2, 1 / 2])


def test_f1_is_per_visit_harmonic_mean():
    # true {0,1,2}, predicted {0,3,4,5}: p = 1/4, r = 1/3, F1 = 2pr/(p+r) = 2/7 (p + r < 1)
    probs = torch.tensor([[[0.9, 0.1, 0.1, 0.8, 0.7, 0.6]]])
    target = torch.tensor([[[1, 1, 1, 0, 0, 0]]])
    scores = visit_scores(probs, target, torch.tensor([[True]]))
    assert scores["precision"].item() == pytest.approx(1 / 4)
    assert scores["recall"].item() == pytest.approx(1 / 3)
    assert scores["f1"].item() == pytest.approx(2 / 7)
    assert scores["jaccard"].item() == pytest.approx(1 / 6)


def test_prauc_is_zero_without_positive():
    probs = torch.tensor([[[0.9, 0.2, 0.4]]])
    target = torch.zeros(1, 1, 3, dtype=torch.long)
    scores = visit_scores(probs, target, torch.tensor([[True]]))
    assert scores["prauc"].item() == 0.0
    assert scores["recall"].item() == 0.0 and scores["jaccard"].item() == 0.0
    assert math.isnan(scores["rocauc"].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_visit_scores_match_sklearn_with_ties(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    probs = (torch.round(torch.rand(6, 8, 12, generator=gen) * 8) / 8).to(dtype)
    target = (torch.rand(6, 8, 12, generator=gen) < 0.3).long()
    target[0, 0] = 0
    target[0, 1] = 1
    target[0, 2] = 0
    target[0, 2, 3] = 1
    mask = torch.ones(6, 8, dtype=torch.bool)
    scores = visit_scores(probs, target, mask)
    flat = {name: value.reshape(-1).tolist() for name, value in scores.items()}
    ys = target.reshape(-1, 12).numpy()
    ps = probs.reshape(-1, 12).numpy()
    checked_auc = 0
    for i, (y, p) in enumerate(zip(ys, ps, strict=True)):
        pred = (p >= 0.5).astype(int)
        assert flat["jaccard"][i] == pytest.approx(jaccard_score(y, pred, zero_division=0), abs=1e-6)
        assert flat["precision"][i] == pytest.approx(precision_score(y, pred, zero_division=0), abs=1e-6)
        assert flat["recall"][i] == pytest.approx(recall_score(y, pred, zero_division=0), abs=1e-6)
        assert flat["f1"][i] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-6)
        if y.any():
            assert flat["prauc"][i] == pytest.approx(average_precision_score(y, p), abs=1e-6)
        else:
            assert flat["prauc"][i] == 0.0
        if 0 < y.sum() < len(y):
            assert flat["rocauc"][i] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
            checked_auc += 1
        else:
            assert math.isnan(flat["rocauc"][i])
    assert checked_auc > 40


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_collection_matches_safedrug_reference_loops(seed):
    probs, target, mask, adj = random_batch(seed)
    got = compute_all(probs, target, mask, adj)
    expected = reference_results(probs, target, mask, adj)
    for key in SUMMARY:
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    table = PatientMetricTable(adj)
    table.update(probs, target, mask)
    summary = summarize(table.compute())
    for key in SUMMARY:
        assert summary[key] == pytest.approx(expected[key], abs=1e-5), key


# ---------------------------------------------------------------------------
# DDI rate and drug count
# ---------------------------------------------------------------------------
def test_ddi_rate_single_visit():
    probs = torch.tensor([[[0.9, 0.8, 0.7, 0.1]]])
    mask = torch.tensor([[True]])
    adj = torch.zeros(4, 4)
    adj[0, 2] = adj[2, 0] = 1
    metric = DDIRate(adj)
    metric.update(probs, mask)
    assert metric.ddi_pairs.item() == 1 and metric.all_pairs.item() == 3
    assert metric.compute().item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("direction", ["upper", "lower"])
def test_ddi_rate_asymmetric_adjacency_and_diagonal(direction):
    adj = torch.zeros(4, 4)
    if direction == "upper":
        adj[0, 2] = 1
    else:
        adj[2, 0] = 1
    adj[0, 0] = adj[1, 1] = 1  # a drug never interacts with itself
    adj[3, 1] = 1  # drug 3 is never predicted
    metric = DDIRate(adj)
    metric.update(torch.tensor([[[0.9, 0.8, 0.7, 0.1]]]), torch.tensor([[True]]))
    assert metric.compute().item() == pytest.approx(1 / 3)
    expected_buffer = torch.zeros(4, 4)
    expected_buffer[0, 2] = expected_buffer[2, 0] = expected_buffer[1, 3] = expected_buffer[3, 1] = 1
    assert torch.equal(metric.ddi_adj, expected_buffer)
    assert "ddi_adj" not in metric.state_dict()


def test_ddi_rate_and_drug_count_hand_case():
    probs, _, mask = hand_batch()
    ddi = DDIRate(hand_adj())
    drugs = AverageDrugCount()
    ddi.update(probs, mask)
    drugs.update(probs, mask)
    assert (ddi.ddi_pairs.item(), ddi.all_pairs.item()) == (4, 10)
    assert ddi.compute().item() == pytest.approx(0.4)
    assert (drugs.drugs.item(), drugs.visits.item()) == (11, 5)
    assert drugs.compute().item() == pytest.approx(2.2)


def test_ddi_rate_zero_without_pairs():
    metric = DDIRate(torch.ones(3, 3))
    metric.update(torch.tensor([[[0.9, 0.1, 0.1], [0.1, 0.1, 0.1]]]), torch.tensor([[True, True]]))
    assert metric.compute().item() == 0.0


def test_higher_is_better_flags():
    assert Jaccard.higher_is_better and ROCAUC.higher_is_better
    assert DDIRate.higher_is_better is False
    for cls in (*SCORE_CLASSES.values(), DDIRate, AverageDrugCount, PatientMetricTable):
        assert cls.full_state_update is False
        assert "SafeDrug" in (cls.__doc__ or "")


# ---------------------------------------------------------------------------
# threshold and padding
# ---------------------------------------------------------------------------
def test_threshold_respected():
    probs, target, mask = hand_batch()
    got = compute_all(probs, target, mask, hand_adj(), threshold=0.65)
    # predicted sets: A0 {0,2}, A1 {}, B0 {}, B1 {0,2}, B2 {}
    assert got["avg_drugs"] == pytest.approx(4 / 5)
    assert got["ddi_rate"] == pytest.approx(1.0)
    # precision A (1/2 + 0)/2, B (0 + 1 + 0)/3
    assert got["precision"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    # the ranking metrics do not depend on the threshold
    assert got["prauc"] == pytest.approx(HAND_EXPECTED["prauc"])
    assert got["rocauc"] == pytest.approx(HAND_EXPECTED["rocauc"])

    table = PatientMetricTable(hand_adj(), threshold=0.65)
    table.update(probs, target, mask)
    assert table.compute()["drugs"].tolist() == [2, 2]


def test_probability_equal_to_threshold_is_predicted():
    probs = torch.tensor([[[0.3, 0.3 - 1e-6, 0.9]]])
    metric = AverageDrugCount(threshold=0.3)
    metric.update(probs, torch.tensor([[True]]))
    assert metric.compute().item() == 2.0


def test_padding_visits_are_ignored():
    adj = hand_adj()
    baseline_probs, baseline_target, mask = hand_batch(padding_probs=0.99, padding_target=1)
    other_probs, other_target, _ = hand_batch(padding_probs=0.0, padding_target=0)
    baseline = compute_all(baseline_probs, baseline_target, mask, adj)
    other = compute_all(other_probs, other_target, mask, adj)
    for key in SUMMARY:
        assert baseline[key] == pytest.approx(HAND_EXPECTED[key], abs=1e-6), key
        assert other[key] == pytest.approx(baseline[key], abs=1e-7), key

    # random padding content on random data
    probs, target, mask, adj = random_batch(5)
    noisy_probs, noisy_target = probs.clone(), target.clone()
    gen = torch.Generator().manual_seed(99)
    noisy_probs[~mask] = torch.rand(int((~mask).sum()), probs.shape[-1], generator=gen)
    noisy_target[~mask] = 1
    assert (~mask).any()
    clean = compute_all(probs, target, mask, adj)
    noisy = compute_all(noisy_probs, noisy_target, mask, adj)
    for key in SUMMARY:
        assert noisy[key] == pytest.approx(clean[key], abs=1e-7), key


def test_patient_table_hand_case():
    probs, target, mask = hand_batch()
    table = PatientMetricTable(hand_adj())
    table.update(probs, target, mask)
    columns = table.compute()
    assert set(columns) == set(SCORES) | set(COUNTS)
    for name, expected in HAND_PATIENTS.items():
        np.testing.assert_allclose(columns[name].tolist(), expected, atol=1e-6, err_msg=name)
    summary = summarize(columns)
    for key in SUMMARY:
        assert summary[key] == pytest.approx(HAND_EXPECTED[key], abs=1e-6), key


def test_patient_table_skips_patients_without_visits():
    probs, target, mask = hand_batch()
    mask = mask.clone()
    mask[0] = False
    table = PatientMetricTable(hand_adj())
    table.update(probs, target, mask)
    columns = table.compute()
    # torchmetrics squeezes one-element results, hence the reshape
    assert columns["visits"].reshape(-1).tolist() == [3]
    assert columns["jaccard"].reshape(-1).tolist() == pytest.approx([13 / 36])
    summary = summarize(columns)
    assert summary["jaccard"] == pytest.approx(13 / 36)
    assert summary["ddi_rate"] == pytest.approx(2 / 6)
    assert summary["avg_drugs"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------
# state merging (what DDP's sum / cat reduction relies on)
# ---------------------------------------------------------------------------
def test_two_updates_equal_one_update():
    probs, target, mask, adj = random_batch(7)
    whole = recommendation_metrics(adj)
    whole.update(probs=probs, target=target, visit_mask=mask)
    split = recommendation_metrics(adj)
    split.update(probs=probs[:3], target=target[:3], visit_mask=mask[:3])
    split.update(probs=probs[3:], target=target[3:], visit_mask=mask[3:])
    expected = whole.compute()
    got = split.compute()
    for key in SUMMARY:
        assert got[key].item() == pytest.approx(expected[key].item(), abs=1e-6), key


def test_merge_state_equals_single_update():
    probs, target, mask, adj = random_batch(11)
    halves = (slice(0, 4), slice(4, None))
    whole_values = compute_all(probs, target, mask, adj)
    whole_table = PatientMetricTable(adj)
    whole_table.update(probs, target, mask)

    parts = [recommendation_metrics(adj) for _ in halves]
    tables = [PatientMetricTable(adj) for _ in halves]
    for part, table, rows in zip(parts, tables, halves, strict=True):
        part.update(probs=probs[rows], target=target[rows], visit_mask=mask[rows])
        table.update(probs[rows], target[rows], mask[rows])
    for key in SUMMARY:
        parts[0][key].merge_state(parts[1][key])
        assert parts[0][key].compute().item() == pytest.approx(whole_values[key], abs=1e-6), key

    tables[0].merge_state(tables[1])
    merged = tables[0].compute()
    expected = whole_table.compute()
    assert _sorted_rows(merged).shape == (int(mask.any(-1).sum()), 10)
    np.testing.assert_allclose(_sorted_rows(merged), _sorted_rows(expected), atol=1e-6)
    assert summarize(merged) == pytest.approx(summarize(expected), abs=1e-6)


def _sorted_rows(table):
    """Rows of a patient table in a canonical order (merging may reorder them)."""
    rows = np.stack([table[name].double().numpy() for name in (*SCORES, *COUNTS)], axis=1)
    rows = np.nan_to_num(rows, nan=-1.0)
    return rows[np.lexsort(rows.T[::-1])]


def _ddp_worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        probs, target, mask, adj = random_batch(13)
        rows = slice(0, 5) if rank == 0 else slice(5, None)  # uneven shards
        metrics = recommendation_metrics(adj)
        table = PatientMetricTable(adj)
        metrics.update(probs=probs[rows], target=target[rows], visit_mask=mask[rows])
        table.update(probs[rows], target[rows], mask[rows])
        values = {key: value.item() for key, value in metrics.compute().items()}
        columns = table.compute()
        if rank == 0:
            torch.save({"values": values, "table": columns}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_ddp_sync_equals_single_process(tmp_path: Path):
    out_file = tmp_path / "result.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    result = torch.load(out_file)
    probs, target, mask, adj = random_batch(13)
    expected = compute_all(probs, target, mask, adj)
    for key in SUMMARY:
        assert result["values"][key] == pytest.approx(expected[key], abs=1e-6), key
    table = PatientMetricTable(adj)
    table.update(probs, target, mask)
    for name, column in table.compute().items():
        torch.testing.assert_close(result["table"][name], column, equal_nan=True, msg=name)


def test_collection_does_not_share_states_between_metrics():
    # after the first batch (visit A0 alone) precision, recall and F1 are all 1/2; torchmetrics'
    # compute groups would then share one state between them and keep them equal
    probs, target, mask = hand_batch()
    metrics = recommendation_metrics(hand_adj())
    first = (slice(0, 1), slice(0, 1))
    metrics.update(probs=probs[first], target=target[first], visit_mask=mask[first])
    metrics.update(probs=probs[1:], target=target[1:], visit_mask=mask[1:])
    values = metrics.compute()
    assert values["precision"].item() == pytest.approx((1 / 2 + 4 / 9) / 2)
    assert values["recall"].item() == pytest.approx((1 / 2 + 7 / 12) / 2)
    assert values["f1"].item() == pytest.approx((1 / 2 + 19 / 42) / 2)


# ---------------------------------------------------------------------------
# summarize and bootstrap
# ---------------------------------------------------------------------------
def make_table(rows):
    names = (*SCORES, *COUNTS)
    columns = list(zip(*rows, strict=True))
    table = {}
    for name, column in zip(names, columns, strict=True):
        dtype = torch.float32 if name in SCORES else torch.long
        table[name] = torch.tensor(column, dtype=dtype)
    return table


def test_summarize_uses_global_ratios():
    # rows: jaccard precision recall f1 prauc rocauc ddi_pairs all_pairs drugs visits
    table = make_table(
        [
            (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1, 1, 2, 1),
            (0.4, 0.5, 0.6, 0.7, 0.8, NAN, 0, 9, 10, 4),
        ]
    )
    summary = summarize(table)
    assert set(summary) == set(SUMMARY)
    # global 1/10, not the mean of per-patient rates (1 + 0) / 2
    assert summary["ddi_rate"] == pytest.approx(0.1)
    # global 12/5, not (2 + 2.5) / 2
    assert summary["avg_drugs"] == pytest.approx(12 / 5)
    assert summary["jaccard"] == pytest.approx(0.3)
    assert summary["f1"] == pytest.approx(0.6)
    assert summary["rocauc"] == pytest.approx(0.7)


def test_bootstrap_identical_patients_has_zero_std():
    row = (0.25, 0.5, 0.75, 0.6, 0.8, 0.9, 3, 12, 7, 2)
    table = make_table([row] * 6)
    result = bootstrap(table, rounds=5, fraction=1.0, seed=3)
    expected = {
        "jaccard": 0.25,
        "precision": 0.5,
        "recall": 0.75,
        "f1": 0.6,
        "prauc": 0.8,
        "rocauc": 0.9,
        "ddi_rate": 0.25,
        "avg_drugs": 3.5,
    }
    assert set(result) == set(SUMMARY) | {f"{key}_std" for key in SUMMARY}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
        assert result[f"{key}_std"] == pytest.approx(0.0, abs=1e-7), key


def _varied_table(n=20, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        scores = tuple(rng.uniform(0, 1, size=6).round(3))
        all_pairs = int(rng.integers(1, 20))
        rows.append(
            (*scores, int(rng.integers(0, all_pairs + 1)), all_pairs, int(rng.integers(1, 30)), int(rng.integers(1, 6)))
        )
    return make_table(rows)


def test_bootstrap_deterministic_by_seed():
    table = _varied_table()
    first = bootstrap(table, rounds=10, fraction=0.8, seed=42)
    again = bootstrap(table, rounds=10, fraction=0.8, seed=42)
    other = bootstrap(table, rounds=10, fraction=0.8, seed=43)
    assert first == again
    assert first != other
    assert all(first[f"{key}_std"] > 0 for key in SUMMARY)


def test_bootstrap_samples_with_replacement():
    # fraction 1 without replacement would reproduce the full table in every round (std 0)
    table = _varied_table()
    result = bootstrap(table, rounds=10, fraction=1.0, seed=0)
    assert result["jaccard_std"] > 0
    assert result["ddi_rate_std"] > 0


def test_bootstrap_follows_safedrug_protocol():
    table = _varied_table(n=13, seed=1)
    result = bootstrap(table, rounds=6, fraction=0.8, seed=5)
    rng = np.random.default_rng(5)
    numpy_table = {name: column.numpy() for name, column in table.items()}
    rounds = []
    for _ in range(6):
        index = rng.choice(13, size=round(13 * 0.8), replace=True)
        rounds.append(summarize({name: torch.from_numpy(col[index]) for name, col in numpy_table.items()}))
    for key in SUMMARY:
        values = np.array([figures[key] for figures in rounds])
        assert result[key] == pytest.approx(values.mean(), abs=1e-9), key
        assert result[f"{key}_std"] == pytest.approx(values.std(ddof=0), abs=1e-9), key
    # the full-table figures differ from every resample here, so the resampling really happened
    assert result["jaccard"] != pytest.approx(summarize(table)["jaccard"], abs=1e-9)


def test_bootstrap_rejects_empty_table():
    empty = {name: torch.zeros(0) for name in (*SCORES, *COUNTS)}
    with pytest.raises(ValueError):
        bootstrap(empty)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    probs, target, mask, adj = random_batch(17)
    expected = compute_all(probs, target, mask, adj)
    metrics = recommendation_metrics(adj).to("cuda")
    table = PatientMetricTable(adj).to("cuda")
    cuda_args = {"probs": probs.cuda(), "target": target.cuda(), "visit_mask": mask.cuda()}
    metrics.update(**cuda_args)
    table.update(**cuda_args)
    values = metrics.compute()
    for key in SUMMARY:
        assert values[key].device.type == "cuda"
        assert values[key].item() == pytest.approx(expected[key], abs=1e-6), key
    reference = reference_results(probs, target, mask, adj)
    assert summarize(table.compute()) == pytest.approx(reference, abs=1e-5)


def test_batch_pair_counts_are_exact_under_bf16_autocast():
    # 50 drugs all recommended, all interacting: 1225 pairs, an integer bfloat16 cannot hold
    m = 50
    adj = torch.ones(m, m) - torch.eye(m)
    probs = torch.ones(1, 1, m)
    mask = torch.ones(1, 1, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ddi, total = batch_pair_counts(probs.bfloat16(), mask, adj)
    assert (ddi.item(), total.item()) == (1225, 1225)
    assert ddi.dtype == total.dtype == torch.float32


def test_batch_pair_counts_count_like_the_ddi_rate_metric():
    # a one-sided adjacency entry counts, a drug with itself never does (the metric's rule)
    adj = torch.zeros(3, 3)
    adj[0, 1] = adj[2, 2] = 1.0
    probs = torch.tensor([[[0.9, 0.9, 0.9]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    ddi, total = batch_pair_counts(probs, mask, adj)
    metric = DDIRate(adj)
    metric.update(probs, mask)
    assert ddi.item() / total.item() == pytest.approx(metric.compute().item()) == pytest.approx(1 / 3)
