"""MICRON: the residual set update by hand, causality, the loss pieces, learning, refused options."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_tensors, first_batch, fit_and_test, handmade_datamodule
from torch import nn

from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import MICRON, DrugFrequency
from lightning_modules.micron import set_scores, updated_sets
from lightning_modules.visit_ops import dropped_out_code_sums


@pytest.fixture()
def data(tmp_path):
    return handmade_datamodule(tmp_path / "c")


def test_set_update_adds_and_removes_by_hand():
    # one patient, three visits, three drugs; δ_add = 0.8, δ_remove = 0.2
    probs = torch.tensor([[[0.6, 0.4, 0.1], [0.5, 0.9, 0.1], [0.1, 0.5, 0.85]]])
    recorded_previous = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    recorded = updated_sets(probs, mask, recorded_previous, 0.8, 0.2)
    # visit 0: p >= 0.5; visit 1: {2} + {1} (0.9) - {2} (0.1); visit 2: {0} - {0} (0.1) + {2} (0.85)
    assert recorded[0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    rolled = updated_sets(probs, mask, None, 0.8, 0.2)
    # visit 1 keeps drug 0 (0.5 is between the thresholds), adds 1, drug 2 stays out; visit 2 drops 0, keeps 1
    assert rolled[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    padded = updated_sets(probs, torch.tensor([[True, True, False]]), None, 0.8, 0.2)
    assert not padded[0, 2].any()


def test_rolled_update_equals_the_visit_by_visit_recursion():
    torch.manual_seed(0)
    probs = torch.rand(5, 7, 9)
    mask = torch.ones(5, 7, dtype=torch.bool)
    sets = updated_sets(probs, mask, None, 0.7, 0.3)
    state = probs[:, 0] >= 0.5
    for t in range(1, 7):
        state = (state | (probs[:, t] >= 0.7)) & ~(probs[:, t] < 0.3)
        assert torch.equal(sets[:, t], state)


def test_scores_hold_the_set_above_one_half_and_rank_by_probability():
    chosen = torch.tensor([True, False, True, False])
    scores = set_scores(chosen, torch.tensor([0.3, 0.99, 0.9, 0.2]))
    assert ((scores >= 0.5) == chosen).all()
    assert scores.tolist() == pytest.approx([0.65, 0.49401, 0.95, 0.0998])


def test_medication_vector_is_the_first_prediction_plus_the_residuals(data):
    torch.manual_seed(0)
    model = MICRON(knowledge=data.knowledge, embedding_dim=8).eval()
    batch = first_batch(data)
    parts = model.representations(batch)
    assert parts["current"].shape == (*batch["visit_mask"].shape, 4)
    m = model.medication_vector(parts)
    expected = parts["current"][:, 0] + parts["residual"][:, 1] + parts["residual"][:, 2]
    torch.testing.assert_close(m[:, 2], expected)
    probs = model.predict_probabilities(batch)
    assert probs.shape == parts["current"].shape
    assert (probs[~batch["visit_mask"]] == 0).all()


def test_visit_t_sees_the_recorded_drugs_of_t_minus_1_and_nothing_later(data):
    torch.manual_seed(0)
    model = MICRON(knowledge=data.knowledge, add_threshold=0.99, remove_threshold=0.01).eval()
    batch = first_batch(data)
    b = int(torch.argmax(batch["lengths"]))  # a patient with 3 visits
    before = model.predict_probabilities(batch)
    changed = {k: v.clone() for k, v in batch_tensors(batch).items()}
    changed["medications"][b, 1] = 1 - changed["medications"][b, 1]
    changed["diagnoses"][b, 2] = (changed["diagnoses"][b, 2] + 1) % data.knowledge.num_diagnoses
    after = model.predict_probabilities(changed)
    torch.testing.assert_close(before[b, :2], after[b, :2])
    # thresholds this wide keep the previous set: visit 2 recommends visit 1's recorded drugs
    assert torch.equal(after[b, 2] >= 0.5, changed["medications"][b, 1].bool())


def test_loss_terms_and_reconstruction_only_after_the_first_visit(data):
    torch.manual_seed(0)
    model = MICRON(knowledge=data.knowledge, embedding_dim=8)
    batch = first_batch(data)
    losses = model.compute_loss(model.representations(batch), batch)
    assert set(losses) == {"bce", "margin", "rec", "ddi", "loss"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["rec"] > 0
    first_only = {k: (v[:, :1] if v.dim() > 1 else v) for k, v in batch_tensors(batch).items()}
    assert model.compute_loss(model.representations(first_only), first_only)["rec"] == 0
    no_extra = MICRON(knowledge=data.knowledge, embedding_dim=8, rec_weight=0.0, ddi_weight=0.0)
    no_extra.load_state_dict(model.state_dict())
    model.eval(), no_extra.eval()
    plain = no_extra.compute_loss(no_extra.representations(batch), batch)
    torch.testing.assert_close(plain["loss"], 0.95 * plain["bce"] + 0.05 * plain["margin"])


def test_micron_learns_the_synthetic_signal():
    data = VisitSequenceDataModule(synthetic_patients=300, synthetic_seed=7, batch_size=16)
    data.setup("fit")
    frequency = fit_and_test(DrugFrequency(knowledge=data.knowledge), data, epochs=1)
    torch.manual_seed(0)
    result = fit_and_test(MICRON(knowledge=data.knowledge, lr=5e-3, dropout=0.1), data, epochs=6)
    assert result["test_jaccard"] > frequency["test_jaccard"] + 0.12
    assert result["test_prauc"] > frequency["test_prauc"] + 0.05


@pytest.mark.parametrize(
    "options, message",
    [
        ({"add_threshold": 0.3, "remove_threshold": 0.4}, "remove_threshold < add_threshold"),
        ({"previous_set": "oracle"}, "previous_set must be"),
        ({"rec_weight": -1.0}, "rec_weight"),
    ],
)
def test_bad_options_are_refused_by_name(data, options, message):
    with pytest.raises(ValueError, match=message):
        MICRON(knowledge=data.knowledge, **options)


def test_micron_takes_no_recommendation_threshold(data):
    with pytest.raises(TypeError, match="threshold"):
        MICRON(knowledge=data.knowledge, threshold=0.4)


def test_dropped_out_code_sums_skip_padding():
    torch.manual_seed(0)
    table = nn.Embedding(4, 3)
    codes = torch.tensor([[[1, 2, 0], [3, 0, 0]], [[2, 0, 0], [0, 0, 0]]])
    mask = codes > 0
    expected = (table(codes) * mask.unsqueeze(-1)).sum(-2)
    torch.testing.assert_close(dropped_out_code_sums(table, codes, mask, nn.Dropout(0.5).eval()), expected)
    with torch.no_grad():
        table.weight[0] = 1e6  # the padding index: must never reach a sum, dropped out or not
    sums = dropped_out_code_sums(table, codes, mask, nn.Dropout(0.5).train())
    assert sums.abs().max() < 1e3 and sums[1, 1].abs().sum() == 0
