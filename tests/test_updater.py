"""PrescriptionUpdater: the keep/add update by hand, causality, the continuation path, the PID-controlled
DDI loss, learning the synthetic signal, and the validation-only search script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import batch_tensors, first_batch, fit_and_test, handmade_datamodule

from callbacks import PIDDDIController
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import DrugFrequency, PrescriptionUpdater
from lightning_modules.updater import updated_prescription


@pytest.fixture()
def data(tmp_path):
    return handmade_datamodule(tmp_path / "c")


def test_keep_and_add_thresholds_by_hand():
    # one patient, three visits, three drugs; first visit 0.5, keep 0.3, add 0.7
    probs = torch.tensor([[[0.6, 0.4, 0.1], [0.5, 0.6, 0.25], [0.35, 0.65, 0.9]]])
    previous = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    sets = updated_prescription(probs, previous, mask, 0.5, 0.3, 0.7)
    # visit 0: p >= 0.5; visit 1: drug 0 kept (0.5 >= 0.3), drug 1 new but 0.6 < 0.7, drug 2 dropped
    # (0.25 < 0.3); visit 2: drugs 0 and 1 kept (>= 0.3), drug 2 added (0.9 >= 0.7)
    assert sets[0].int().tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 1]]
    padded = updated_prescription(probs, previous, torch.tensor([[True, True, False]]), 0.5, 0.3, 0.7)
    assert not padded[0, 2].any()


def test_equal_thresholds_are_plain_thresholding(data):
    torch.manual_seed(0)
    model = PrescriptionUpdater(knowledge=data.knowledge, embedding_dim=8, hidden_dim=16, threshold=0.4,
                                keep_threshold=0.4, add_threshold=0.4).eval()  # fmt: skip
    batch = first_batch(data)
    probs = torch.sigmoid(model(batch))
    scores = model.predict_probabilities(batch)
    mask = batch["visit_mask"]
    assert torch.equal(scores[mask] >= 0.5, probs[mask] >= 0.4)
    assert (scores[~mask] == 0).all()


def test_visit_t_sees_the_recorded_drugs_of_t_minus_1_and_nothing_later(data):
    torch.manual_seed(0)
    model = PrescriptionUpdater(knowledge=data.knowledge, embedding_dim=8, hidden_dim=16).eval()
    batch = first_batch(data)
    b = int(torch.argmax(batch["lengths"]))  # a patient with 3 visits
    before = model(batch)
    changed = {k: v.clone() for k, v in batch_tensors(batch).items()}
    changed["medications"][b, 2] = 1 - changed["medications"][b, 2]  # visit 2's own target
    torch.testing.assert_close(model(changed), before)
    changed["medications"][b, 1] = 1 - changed["medications"][b, 1]  # visit 2's previous prescription
    after = model(changed)
    torch.testing.assert_close(after[b, :2], before[b, :2])
    assert not torch.allclose(after[b, 2], before[b, 2])


def test_the_continuation_raises_only_the_previously_prescribed_drugs(data):
    torch.manual_seed(0)
    model = PrescriptionUpdater(knowledge=data.knowledge, embedding_dim=8, hidden_dim=16).eval()
    batch = first_batch(data)
    before = model(batch)
    with torch.no_grad():
        model.members[0].continuation.fill_(2.0)
    after = model(batch)
    previous = torch.cat([torch.zeros_like(batch["medications"][:, :1]), batch["medications"][:, :-1]], dim=1)
    mask = batch["visit_mask"].unsqueeze(-1)
    torch.testing.assert_close(after - before, 2.0 * previous * mask)
    assert previous[batch["visit_mask"]].sum() > 0  # the handmade cohort has repeat visits


def test_beta_follows_the_ddi_rate_of_the_recommended_sets(data):
    torch.manual_seed(0)
    model = PrescriptionUpdater(knowledge=data.knowledge, embedding_dim=8, hidden_dim=16, keep_threshold=0.01,
                                add_threshold=0.01, threshold=0.01)  # fmt: skip
    batch = first_batch(data)
    strict = PIDDDIController(target_ddi=0.0, kp=0.05)
    model.ddi_controller = strict
    model.training_step(batch, 0)  # every drug recommended: the interacting pair is in every set
    assert strict.ddi_rate > 0 and strict.beta < 1
    lenient = PIDDDIController(target_ddi=1.0, kp=0.05)
    model.ddi_controller = lenient
    model.training_step(batch, 0)
    assert lenient.beta == 1.0
    losses = model.compute_loss(model(batch), batch, beta=0.0)
    torch.testing.assert_close(losses["loss"], losses["ddi"])
    assert losses["ddi"] > 0


def test_the_updater_learns_the_synthetic_signal():
    data = VisitSequenceDataModule(synthetic_patients=300, synthetic_seed=7, batch_size=16)
    data.setup("fit")
    frequency = fit_and_test(DrugFrequency(knowledge=data.knowledge), data, epochs=1)
    torch.manual_seed(0)
    result = fit_and_test(PrescriptionUpdater(knowledge=data.knowledge, lr=5e-3, dropout=0.1), data, epochs=6)
    assert result["test_jaccard"] > frequency["test_jaccard"] + 0.12
    assert result["test_prauc"] > frequency["test_prauc"] + 0.05


def test_the_validation_search_reads_no_test_patient(tiny_cohort_dir, tmp_path, monkeypatch):
    from benchmarks import validation_search

    monkeypatch.chdir(tmp_path)
    read = []
    original = VisitSequenceDataModule.test_dataloader
    monkeypatch.setattr(VisitSequenceDataModule, "test_dataloader", lambda self: read.append(1) or original(self))
    out = tmp_path / "search"
    config = str(validation_search.ROOT / "configs/updater.yaml")
    validation_search.run(["--config", config, "--data", str(tiny_cohort_dir), "--out", str(out), "--epochs", "1",
                           "--seed", "3"])  # fmt: skip
    assert not read
    saved = json.loads((out / "search.json").read_text())
    assert 0 < saved["val"]["jaccard"] < 1
    grid = saved["grid"]
    assert len(grid) == len(validation_search.FIRST) * len(validation_search.KEEP) * len(validation_search.ADD)
    allowed = [row for row in grid if row["ddi_rate"] <= 0.06]
    assert saved["best_under_ddi"]["jaccard"] == max(row["jaccard"] for row in allowed)
    settings = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    own = tuple(settings[k] for k in ("threshold", "keep_threshold", "add_threshold"))
    row = next(r for r in grid if (r["threshold"], r["keep_threshold"], r["add_threshold"]) == own)
    assert row["jaccard"] == pytest.approx(saved["val"]["jaccard"], abs=1e-6)  # the config's own thresholds


def test_members_average_their_logits_and_each_trains_on_its_own_loss(data):
    torch.manual_seed(0)
    model = PrescriptionUpdater(knowledge=data.knowledge, embedding_dim=8, hidden_dim=16, members=3,
                                jaccard_weight=0.5).eval()  # fmt: skip
    batch = first_batch(data)
    members = model.member_logits(batch)
    assert members.shape == (3, *batch["visit_mask"].shape, data.knowledge.num_medications)
    assert not torch.allclose(members[0], members[1])  # initialised apart
    torch.testing.assert_close(model(batch), members.mean(0))
    losses = model.compute_loss(members, batch)
    one = [model.compute_loss(m, batch)["loss"] for m in members]
    torch.testing.assert_close(losses["loss"], torch.stack(one).mean())
    assert 0 < losses["jaccard"] < 1
    with pytest.raises(ValueError, match="members"):
        PrescriptionUpdater(knowledge=data.knowledge, members=0)


@pytest.mark.parametrize("option", ["keep_threshold", "add_threshold"])
@pytest.mark.parametrize("value", [0.0, 1.5, -0.2])
def test_an_update_threshold_outside_zero_one_is_refused_by_name(data, option, value):
    with pytest.raises(ValueError, match=rf"{option} \(--model.init_args.{option}\) must lie in \(0, 1\]"):
        PrescriptionUpdater(knowledge=data.knowledge, **{option: value})


def test_the_ablations_remove_their_ingredient(data):
    torch.manual_seed(0)
    batch = first_batch(data)
    b = int(torch.argmax(batch["lengths"]))
    changed = {k: v.clone() for k, v in batch_tensors(batch).items()}
    changed["medications"][b, 1] = 1 - changed["medications"][b, 1]
    blind = PrescriptionUpdater(knowledge=data.knowledge, embedding_dim=8, hidden_dim=16, previous_input=False).eval()
    assert blind.members[0].med_embedding is None and blind.members[0].continuation is None
    torch.testing.assert_close(blind(changed), blind(batch))  # the previous prescription is not an input
    no_history = PrescriptionUpdater(knowledge=data.knowledge, embedding_dim=8, hidden_dim=16, history=False).eval()
    assert no_history.members[0].gru is None
    # without history, visit 2 depends on its own codes and visit 1's drugs only
    previous = batch["medications"][b, 1]
    full = no_history(batch)[b, 2]
    with torch.no_grad():
        member = no_history.members[0]
        codes = torch.cat(
            [
                member.diag_embedding(batch["diagnoses"][b, 2])[batch["diagnoses_mask"][b, 2]].sum(0),
                member.proc_embedding(batch["procedures"][b, 2])[batch["procedures_mask"][b, 2]].sum(0),
                member.med_embedding(previous),
            ]
        )
        expected = member.head(codes) + previous * member.continuation
    torch.testing.assert_close(full, expected)
