"""SafeDrug/GAMENet benchmark pickles -> cohort (real files when present, small fakes always)."""

from __future__ import annotations

import pickle

import dill
import numpy as np
import pytest
from conftest import BENCHMARK, needs_benchmark

from datamodules.benchmark import read_benchmark
from datamodules.cohort import CohortError
from datamodules.sources import detect_source, resolve_cohort
from datamodules.visit_sequence import VisitSequenceDataModule


class Voc:  # the shape of the authors' vocabulary object
    def __init__(self, words):
        self.idx2word = dict(enumerate(words))
        self.word2idx = {w: i for i, w in self.idx2word.items()}


def write_fake_benchmark(folder, records, n_med=3):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "records_final.pkl", "wb") as fh:
        pickle.dump(records, fh)
    voc = {"diag_voc": Voc(["d0", "d1"]), "pro_voc": Voc(["p0"]), "med_voc": Voc([f"M{i:02d}A" for i in range(n_med)])}
    with open(folder / "voc_final.pkl", "wb") as fh:
        dill.dump(voc, fh)
    ddi = np.zeros((n_med, n_med))
    ddi[0, 2] = ddi[2, 0] = 1
    with open(folder / "ddi_A_final.pkl", "wb") as fh:
        pickle.dump(ddi, fh)
    return folder


def test_fake_benchmark_imports(tmp_path):
    records = [[[[0], [0], [0, 1]], [[1], [0], [2]]], [[[0, 1], [0], [1]]]]
    cohort = read_benchmark(write_fake_benchmark(tmp_path / "b", records))
    assert cohort.summary()["patients"] == 2 and len(cohort.visits) == 3
    assert [list(m) for m in cohort.visits["medications"]] == [[0, 1], [2], [1]]
    assert cohort.ddi_pairs == [("M00A", "M02A")]
    assert cohort.fields == set()
    assert detect_source(tmp_path / "b") == "benchmark"


@pytest.mark.parametrize(
    "records, message",
    [
        ([[[[0], [0], [0]]], []], "patient 1 has no visits"),
        ([[[[0], [0]]]], r"not \[diagnoses, procedures, medications\]"),
        ([[[[0], [0], [5]]]], "index 5 outside the medication vocabulary"),
        ({"not": "a list"}, "expected a list of patients"),
    ],
)
def test_fake_benchmark_bad_records(tmp_path, records, message):
    with pytest.raises(CohortError, match=message):
        read_benchmark(write_fake_benchmark(tmp_path / "b", records))


def test_missing_or_corrupt_benchmark_files(tmp_path):
    folder = write_fake_benchmark(tmp_path / "b", [[[[0], [0], [0]]]])
    (folder / "ddi_A_final.pkl").write_bytes(b"garbage")
    with pytest.raises(CohortError, match="ddi_A_final.pkl: cannot be unpickled"):
        read_benchmark(folder)
    (folder / "voc_final.pkl").unlink()
    with pytest.raises(CohortError, match="benchmark file voc_final.pkl is missing"):
        read_benchmark(folder)


def test_unrecognised_root_is_a_clear_error(tmp_path):
    with pytest.raises(CohortError, match="holds no recognised data"):
        resolve_cohort(tmp_path)
    with pytest.raises(CohortError, match="does not exist"):
        resolve_cohort(tmp_path / "nope")


@needs_benchmark
def test_real_benchmark_counts():
    cohort = resolve_cohort(BENCHMARK)
    summary = cohort.summary()
    assert summary["patients"] == 6350
    assert summary["visits"] == 15032
    assert summary["medication_vocab"] == 112
    assert summary["diagnosis_vocab"] == 1958 and summary["procedure_vocab"] == 1430
    assert summary["ddi_pairs"] == 337
    assert summary["drugs_with_smiles"] == 112
    assert cohort.vocab["medication"][:3] == ["N02B", "A01A", "A02B"]
    # patient order of the pickle is kept (the reference split depends on it)
    first = cohort.visits[cohort.visits["patient_id"] == cohort.visits["patient_id"].iloc[0]]
    assert [list(m) for m in first["medications"]][0] == list(range(16))


@needs_benchmark
def test_real_benchmark_reference_split_and_training_graph():
    data = VisitSequenceDataModule(root=str(BENCHMARK))
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 4233, "test": 1058, "val": 1059}
    # the co-prescription graph is rebuilt from training visits only (the shipped file leaks test visits)
    assert int(data.knowledge.ehr_adj.sum()) == 11004
    assert int(data.knowledge.ddi_adj.sum()) == 674
