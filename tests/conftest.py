"""Shared fixtures: a private cache folder, tiny synthetic cohorts, the real benchmark when present."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARK = SHARED_DATA / "mimic3-safedrug"

needs_benchmark = pytest.mark.skipif(
    not (BENCHMARK / "records_final.pkl").is_file(), reason=f"real benchmark not found at {BENCHMARK}"
)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Generated/imported cohorts go to a temporary folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("medrec-cache")
    old = os.environ.get("MEDREC_CACHE")
    os.environ["MEDREC_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("MEDREC_CACHE", None)
    else:
        os.environ["MEDREC_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_cohort():
    from datamodules.synthetic import SyntheticSpec, generate_synthetic_cohort

    return generate_synthetic_cohort(SyntheticSpec(patients=150, seed=3))


@pytest.fixture(scope="session")
def tiny_cohort_dir(tiny_cohort, tmp_path_factory):
    return tiny_cohort.save(tmp_path_factory.mktemp("cohorts") / "tiny")


@pytest.fixture()
def tiny_datamodule(tiny_cohort_dir):
    from datamodules.visit_sequence import VisitSequenceDataModule

    return VisitSequenceDataModule(root=str(tiny_cohort_dir), batch_size=16)


@pytest.fixture(scope="module")
def single_intra_op_thread():
    """Package-graph batches are many tiny ops: one intra-op thread is faster than two, and
    immune to the oversubscription of a shared 2-core machine (where two were 40x slower).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("single_intra_op_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def handmade_datamodule(folder, n_patients=12, batch_size=4):
    """The set-up VisitSequenceDataModule of a ``write_cohort`` cohort written to ``folder``."""
    from datamodules.visit_sequence import VisitSequenceDataModule

    dm = VisitSequenceDataModule(root=str(write_cohort(folder, n_patients=n_patients)), batch_size=batch_size)
    dm.setup("fit")
    return dm


def first_batch(dm, split="train"):
    """The first unshuffled batch of a split."""
    return next(iter(dm._loader(split, shuffle=False)))


def write_cohort(folder, n_patients=9, visits_per_patient=(1, 2, 3), empty_meds=False):
    """A handmade cohort whose every value a test can compute by hand."""
    from datamodules.cohort import Cohort

    rows = []
    for p in range(n_patients):
        for t in range(visits_per_patient[p % len(visits_per_patient)]):
            rows.append(
                {
                    "patient_id": f"P{p}",
                    "visit_id": f"P{p}-{t}",
                    "visit_order": t,
                    "diagnoses": [p % 3, (p + t) % 3][: 1 + t % 2],
                    "procedures": [t % 2],
                    "medications": [] if empty_meds and p == 4 else [p % 4, 3] if t else [p % 4],
                    "age": 50.0 + p,
                    "gender": "F" if p % 2 else "M",
                }
            )
    cohort = Cohort(
        visits=pd.DataFrame(rows),
        vocab={"diagnosis": ["a", "b", "c"], "procedure": ["x", "y"], "medication": ["A01A", "B01A", "C01A", "D01A"]},
        ddi_pairs=[("A01A", "D01A")],
        source="handmade",
    )
    return cohort.save(folder)


def quiet_trainer(**options):
    """A Trainer without logger, checkpoints, progress bar or model summary; ``options`` add or override."""
    import lightning as L

    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**quiet, **options})


def fit_and_test(model, datamodule, epochs: int, callbacks=()) -> dict:
    """Seeded quiet fit, then the test figures of the last weights."""
    import lightning as L

    L.seed_everything(0)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=list(callbacks))
    trainer.fit(model, datamodule=datamodule)
    return trainer.test(model, datamodule=datamodule, verbose=False)[0]


def batch_tensors(batch: dict) -> dict:
    """The tensor entries of a visit batch (it also carries the patient and visit id lists)."""
    import torch

    return {k: v for k, v in batch.items() if torch.is_tensor(v)}
