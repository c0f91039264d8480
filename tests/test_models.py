"""Baselines and the shared base: causality, hand cases, checkpoint safety (batch invariance: test_protocol.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import first_batch, handmade_datamodule, quiet_trainer, write_cohort

from datamodules.cohort import CohortError
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import RETAIN, DrugFrequency, LogisticRegression, Nearest
from lightning_modules.visit_ops import margin_targets, multi_hot, previous_visit


@pytest.fixture()
def data(tmp_path):
    return handmade_datamodule(tmp_path / "c")


def test_visit_ops():
    codes = torch.tensor([[2, 0, 0]])
    mask = torch.tensor([[True, True, False]])
    assert multi_hot(codes, mask, 4).tolist() == [[1, 0, 1, 0]]
    history = previous_visit(torch.tensor([[[1.0], [2.0], [3.0]]]))
    assert history.flatten().tolist() == [0.0, 1.0, 2.0]
    assert margin_targets(torch.tensor([[0.0, 1.0, 0.0, 1.0]])).tolist() == [[1, 3, -1, -1]]


@pytest.mark.parametrize("model_class", [LogisticRegression, RETAIN])
def test_prediction_at_t_ignores_the_future(data, model_class):
    torch.manual_seed(0)
    model = model_class(knowledge=data.knowledge).eval()
    batch = first_batch(data)
    b = int(torch.argmax(batch["lengths"]))  # a patient with 3 visits
    before = model(batch)
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    changed["medications"][b, 1] = 1 - changed["medications"][b, 1]  # visit 1's target
    changed["diagnoses"][b, 2] = (changed["diagnoses"][b, 2] + 1) % data.knowledge.num_diagnoses
    after = model(changed)
    torch.testing.assert_close(before[b, :2], after[b, :2])  # visit 0 and 1 unchanged
    if model_class is RETAIN:  # visit 2 sees visit 1's drugs as history
        assert not torch.allclose(before[b, 2], after[b, 2])


def test_nearest_repeats_previous_visit_and_falls_back_to_frequency(data):
    model = Nearest(knowledge=data.knowledge)
    model.prevalence.copy_(torch.tensor([0.6, 0.1, 0.2, 0.9]))
    batch = first_batch(data)
    probs = model.predict_probabilities(batch)
    b = int(torch.argmax(batch["lengths"]))
    # first visit: prevalence itself -> recommends drugs 0 and 3
    assert probs[b, 0].tolist() == pytest.approx([0.6, 0.1, 0.2, 0.9])
    prev = batch["medications"][b, 0]
    expected = 0.5 * prev + 0.5 * torch.tensor([0.6, 0.1, 0.2, 0.9])
    torch.testing.assert_close(probs[b, 1], expected)
    assert ((probs[b, 1] >= 0.5) == prev.bool()).all()


def test_frequency_training_counts_prevalence(data):
    model = DrugFrequency(knowledge=data.knowledge)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, datamodule=data)
    train = data.cohort.visits[data.cohort.visits["patient_id"].isin(data.splits["train"])]
    counts = torch.zeros(4)
    for meds in train["medications"]:
        counts[list(meds)] += 1
    torch.testing.assert_close(model.prevalence, counts / len(train))


def test_margin_loss_mixture(data):
    model = LogisticRegression(knowledge=data.knowledge, margin_weight=0.25)
    batch = first_batch(data)
    losses = model.compute_loss(model(batch), batch)
    torch.testing.assert_close(losses["loss"], 0.75 * losses["bce"] + 0.25 * losses["margin"])
    with pytest.raises(ValueError, match="margin_weight"):
        LogisticRegression(knowledge=data.knowledge, margin_weight=1.5)


def test_model_without_knowledge_says_how_to_get_it():
    with pytest.raises(CohortError, match="needs the data's CohortKnowledge"):
        RETAIN()


def test_checkpoint_round_trip_and_vocabulary_mismatch(data, tmp_path):
    model = LogisticRegression(knowledge=data.knowledge)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = LogisticRegression.from_checkpoint(str(path))
    torch.testing.assert_close(loaded.linear.weight, model.linear.weight)
    assert loaded.knowledge.vocab == data.knowledge.vocab

    other = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "other", n_patients=12)))
    other.knowledge.vocab["medication"] = ["A01A", "B01A", "X99X", "D01A"]
    with pytest.raises(CohortError, match=r"different medication vocabulary .*index 2 is 'C01A' there, 'X99X' here"):
        LogisticRegression.load_from_checkpoint(str(path), knowledge=other.knowledge)


def test_predict_records_name_patients_visits_and_drugs(data):
    model = Nearest(knowledge=data.knowledge)
    model.prevalence.copy_(torch.tensor([0.6, 0.1, 0.2, 0.9]))
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    records = [r for batch in trainer.predict(model, datamodule=data) for r in batch]
    test_visits = data.cohort.visits[data.cohort.visits["patient_id"].isin(data.splits["test"])]
    assert [r["visit_id"] for r in records] == test_visits["visit_id"].tolist()
    first = records[0]
    assert first["patient_id"] == data.splits["test"][0]
    assert first["drugs"] == ["D01A", "A01A"]  # first visit: prevalence >= 0.5, ranked
    assert first["probabilities"] == [0.9, 0.6]
