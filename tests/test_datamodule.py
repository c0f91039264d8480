"""VisitSequenceDataModule: splits, padding, masks, training-only knowledge, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_cohort

from datamodules.cohort import CohortError
from datamodules.visit_sequence import VisitSequenceDataModule


def test_safedrug_split_follows_reference_order(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=9)))
    # n=9: train first int(9*2/3)=6, rest 3 -> test int(3/2)=1, val 2
    assert data.splits == {"train": [f"P{i}" for i in range(6)], "test": ["P6"], "val": ["P7", "P8"]}


def test_random_split_is_seeded_and_disjoint(tmp_path):
    root = str(write_cohort(tmp_path / "c", n_patients=30))
    a = VisitSequenceDataModule(root=root, split="random", split_ratios=(0.6, 0.2, 0.2), seed=1).splits
    b = VisitSequenceDataModule(root=root, split="random", split_ratios=(0.6, 0.2, 0.2), seed=1).splits
    c = VisitSequenceDataModule(root=root, split="random", split_ratios=(0.6, 0.2, 0.2), seed=2).splits
    assert a == b and a != c
    assert [len(a[k]) for k in ("train", "val", "test")] == [18, 6, 6]
    assert set(a["train"]).isdisjoint(a["val"]) and set(a["train"]).isdisjoint(a["test"])
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == {f"P{i}" for i in range(30)}


def test_batch_layout(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=9)), batch_size=3)
    data.setup("fit")
    batch = next(iter(data._loader("train", shuffle=False)))
    # patients P0 (1 visit), P1 (2), P2 (3)
    assert batch["lengths"].tolist() == [1, 2, 3]
    assert batch["visit_mask"].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert batch["medications"].shape == (3, 3, 4)
    # P2 visit 1: medications [2 % 4, 3] = [2, 3]
    assert batch["medications"][2, 1].tolist() == [0, 0, 1, 1]
    assert batch["medications"][0, 1].sum() == 0  # padding visit is empty
    # P1 visit 1: diagnoses [(1) % 3, (1 + 1) % 3] = [1, 2]
    assert batch["diagnoses"][1, 1][batch["diagnoses_mask"][1, 1]].tolist() == [1, 2]
    assert batch["diagnoses_mask"][0, 1].sum() == 0
    assert batch["gender"].tolist() == [2, 1, 2]
    assert torch.isnan(batch["los"]).all()  # cohort has no length of stay
    assert batch["age"][2, :3].tolist() == [52.0, 52.0, 52.0]
    assert batch["labs_mask"].sum() == 0


def test_max_visits_keeps_latest(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c")), max_visits=2)
    sample = data.dataset("train").samples[2]  # P2 has 3 visits
    assert sample["visit_ids"] == ["P2-1", "P2-2"]


def test_knowledge_comes_from_training_split_only(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=9)))
    k = data.knowledge
    assert (k.num_diagnoses, k.num_procedures, k.num_medications) == (3, 2, 4)
    assert k.ddi_adj[0, 3] == 1 and k.ddi_adj[3, 0] == 1 and k.ddi_adj.sum() == 2
    # co-prescriptions in training visits (P0..P5): pairs {p%4, 3} for visits t >= 1
    train_pairs = {(p % 4, 3) for p in range(6) for t in range((1, 2, 3)[p % 3]) if t and p % 4 != 3}
    expected = np.zeros((4, 4))
    for a, b in train_pairs:
        expected[a, b] = expected[b, a] = 1
    np.testing.assert_array_equal(k.ehr_adj, expected)


def test_empty_split_is_a_clear_error(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=2)))
    with pytest.raises(CohortError, match="split 'test' is empty"):
        _ = data.splits


def test_visit_without_drugs_is_a_clear_error(tmp_path):
    data = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", empty_meds=True)))
    with pytest.raises(CohortError, match=r"visit\(s\) have no medication codes \(first: P4-0\)"):
        _ = data.knowledge


def test_bad_arguments():
    with pytest.raises(ValueError, match="split_ratios"):
        VisitSequenceDataModule(split_ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="batch_size"):
        VisitSequenceDataModule(batch_size=0)


def test_pin_memory_follows_the_trainer_device_unless_set(tiny_cohort_dir):
    from types import SimpleNamespace

    import torch

    from datamodules.visit_sequence import VisitSequenceDataModule

    def on(device: str):
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))

    auto = VisitSequenceDataModule(root=str(tiny_cohort_dir))
    assert auto.loader_pins_memory() is False  # no trainer
    auto.trainer = on("cpu")
    assert auto.loader_pins_memory() is False
    auto.trainer = on("cuda")
    assert auto.loader_pins_memory() is True
    never = VisitSequenceDataModule(root=str(tiny_cohort_dir), pin_memory=False)
    never.trainer = on("cuda")
    assert never.loader_pins_memory() is False
