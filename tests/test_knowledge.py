"""What a checkpoint stores of the knowledge: every key ``to_state`` writes is required back, and a
state that lacks one is refused with one line naming it (no defaults for states of earlier code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.errors import CheckpointError
from datamodules.knowledge import CohortKnowledge, TrainingStays
from datamodules.package_graph import PackageGraphDataModule, PackageKnowledge, TrainingVisits


@pytest.fixture(scope="module")
def package_knowledge(tiny_cohort_dir) -> PackageKnowledge:
    return PackageGraphDataModule(root=str(tiny_cohort_dir), batch_size=16).knowledge


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def test_to_state_writes_exactly_the_required_keys(tiny_datamodule, package_knowledge):
    assert tuple(tiny_datamodule.knowledge.to_state()) == CohortKnowledge.STATE_KEYS
    assert tuple(package_knowledge.to_state()) == PackageKnowledge.STATE_KEYS
    assert tuple(package_knowledge.training_visits.to_state()) == TrainingVisits.STATE_KEYS


@pytest.mark.parametrize("key", CohortKnowledge.STATE_KEYS)
def test_a_knowledge_state_without_a_required_key_is_refused_naming_it(tiny_datamodule, key):
    state = tiny_datamodule.knowledge.to_state()
    with pytest.raises(CheckpointError, match=rf"knowledge state lacks '{key}': not written by this version"):
        CohortKnowledge.from_state(without(state, key))


@pytest.mark.parametrize("key", ["document_vocab", "cooccurrence_threshold", "training_visits", "ehr_adj"])
def test_a_package_knowledge_state_without_a_required_key_is_refused_naming_it(package_knowledge, key):
    state = package_knowledge.to_state()
    with pytest.raises(CheckpointError, match=rf"state lacks '{key}'"):
        PackageKnowledge.from_state(without(state, key))
    visits = without(state["training_visits"], "seed")
    with pytest.raises(CheckpointError, match=r"training visits state lacks 'seed'"):
        PackageKnowledge.from_state({**state, "training_visits": visits})


def test_none_values_are_data_without_that_thing_and_load(tiny_datamodule):
    state = tiny_datamodule.knowledge.to_state()
    state.update(relations=None, drug_prevalence=None, diagnosis_prevalence=None, training_stays=None)
    back = CohortKnowledge.from_state(state)
    assert back.relations is None and back.drug_prevalence is None and back.training_stays is None
    assert back.vocab == tiny_datamodule.knowledge.vocab
    np.testing.assert_array_equal(back.ddi_adj, tiny_datamodule.knowledge.ddi_adj)


def test_a_training_stays_state_without_a_required_key_is_refused_naming_it():
    stays = TrainingStays([np.array([1])], [np.array([2])], np.ones(1), np.ones(1), np.zeros((1, 2), np.int64))
    assert TrainingStays.from_state(stays.to_state()).keys.tolist() == [[0, 0]]
    with pytest.raises(CheckpointError, match=r"training stays state lacks 'keys'"):
        TrainingStays.from_state(without(stays.to_state(), "keys"))


def test_a_checkpoint_whose_knowledge_lacks_a_key_fails_to_load_with_that_line(tiny_datamodule, tmp_path):
    from lightning_modules import LogisticRegression
    from lightning_modules.base import KNOWLEDGE_KEY

    model = LogisticRegression(knowledge=tiny_datamodule.knowledge)
    path = tmp_path / "model.ckpt"
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": {}}
    checkpoint[KNOWLEDGE_KEY] = without(tiny_datamodule.knowledge.to_state(), "fields")
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"knowledge state lacks 'fields'"):
        LogisticRegression.from_checkpoint(str(path))


@pytest.mark.parametrize("key", ["cohort_knowledge", "medrec_rng_states"])
def test_a_checkpoint_without_knowledge_or_random_states_does_not_load(tiny_datamodule, tmp_path, key):
    from conftest import quiet_trainer

    from lightning_modules import LogisticRegression
    from lightning_modules.base import KNOWLEDGE_KEY, RNG_KEY

    assert {KNOWLEDGE_KEY, RNG_KEY} == {"cohort_knowledge", "medrec_rng_states"}
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(LogisticRegression(knowledge=tiny_datamodule.knowledge), datamodule=tiny_datamodule)
    trainer.save_checkpoint(tmp_path / "lr.ckpt")
    checkpoint = torch.load(tmp_path / "lr.ckpt", weights_only=False)
    LogisticRegression(knowledge=tiny_datamodule.knowledge).on_load_checkpoint(checkpoint)  # as saved: loads
    del checkpoint[key]
    with pytest.raises(CheckpointError, match=f"the checkpoint has no {key}: not written by this version"):
        LogisticRegression(knowledge=tiny_datamodule.knowledge).on_load_checkpoint(checkpoint)
