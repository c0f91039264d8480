"""Models learn the synthetic signal: clearly better than recommending the most frequent drugs."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_and_test

from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import RETAIN, DrugFrequency, LogisticRegression, Nearest


@pytest.fixture(scope="module")
def data():
    dm = VisitSequenceDataModule(synthetic_patients=500, synthetic_seed=7, batch_size=16)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def frequency(data):
    return fit_and_test(DrugFrequency(knowledge=data.knowledge), data, epochs=1)


def test_frequency_floor_is_sane(frequency):
    assert 0.15 < frequency["test_jaccard"] < 0.45
    assert frequency["test_ddi_rate"] < 0.05  # routine drugs do not interact


@pytest.mark.parametrize(
    "make, epochs",
    [
        (lambda k: LogisticRegression(knowledge=k, lr=1e-2), 8),
        (lambda k: RETAIN(knowledge=k, lr=5e-3, dropout=0.1), 8),
    ],
)
def test_models_beat_frequency_clearly(data, frequency, make, epochs):
    torch.manual_seed(0)
    result = fit_and_test(make(data.knowledge), data, epochs)
    assert result["test_jaccard"] > frequency["test_jaccard"] + 0.15
    assert result["test_prauc"] > frequency["test_prauc"] + 0.1


def test_nearest_uses_history(data, frequency):
    result = fit_and_test(Nearest(knowledge=data.knowledge), data, epochs=1)
    assert result["test_jaccard"] > frequency["test_jaccard"]
