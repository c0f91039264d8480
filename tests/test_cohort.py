"""The cohort format: round trip, knowledge matrices, and clear errors on broken folders."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from datamodules.cohort import Cohort, CohortError, encode_codes


def small_cohort(**overrides) -> Cohort:
    visits = pd.DataFrame(
        {
            "patient_id": ["b", "a", "a"],
            "visit_id": ["b0", "a1", "a0"],
            "visit_order": [0, 1, 0],
            "diagnoses": [[0], [1, 2], [0, 2]],
            "procedures": [[0], [0], [1]],
            "medications": [[0, 1], [2], [1, 2]],
            "los": [2.5, None, 4.0],
        }
    )
    kwargs = dict(
        visits=visits,
        vocab={"diagnosis": ["d0", "d1", "d2"], "procedure": ["p0", "p1"], "medication": ["A01A", "B01A", "M01A"]},
        ddi_pairs=[("B01A", "M01A")],
        smiles={"A01A": ["CCO"]},
        relations=pd.DataFrame(
            [("A01A", "B01A", "synergy", "a->b"), ("B01A", "M01A", "antagonism", "both")],
            columns=["drug_a", "drug_b", "relation", "direction"],
        ),
        medication_names=["Stomatological", "Antithrombotic", "NSAID"],
        source="test",
    )
    kwargs.update(overrides)
    return Cohort(**kwargs)


def test_round_trip_preserves_everything(tmp_path):
    cohort = small_cohort()
    loaded = Cohort.load(cohort.save(tmp_path / "c"))
    # visits are sorted by patient, then visit order
    assert loaded.visits["visit_id"].tolist() == ["a0", "a1", "b0"]
    assert [list(v) for v in loaded.visits["medications"]] == [[1, 2], [2], [0, 1]]
    assert loaded.vocab["medication"] == ["A01A", "B01A", "M01A"]
    assert loaded.medication_names == ["Stomatological", "Antithrombotic", "NSAID"]
    assert loaded.smiles == {"A01A": ["CCO"]}
    assert loaded.fields == {"los"}
    assert np.isnan(loaded.visits["los"].iloc[1])
    meta = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert meta["patients"] == 2 and meta["visits"] == 3 and meta["ddi_pairs"] == 1


def test_knowledge_matrices():
    cohort = small_cohort()
    ddi = cohort.ddi_adjacency()
    assert ddi.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    rel = cohort.relation_matrix()
    assert rel[0, 1] == 1 and rel[1, 0] == 0  # synergy a->b is directed
    assert rel[1, 2] == 2 and rel[2, 1] == 2  # antagonism both ways
    assert rel[0, 2] == 0


def test_require_names_missing_field():
    cohort = small_cohort()
    cohort.require("los")
    with pytest.raises(CohortError, match=r"MiranDa needs visit field\(s\) \['age'\]"):
        cohort.require("los", "age", by="MiranDa")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v: v.assign(medications=[[0], [7], [1]]), "index 7 outside the medication vocabulary of size 3"),
        (lambda v: v.drop(columns=["procedures"]), "lack required column"),
        (lambda v: v.assign(colour=1), "unknown column"),
        (lambda v: v.assign(visit_id=["x", "x", "y"]), "occurs more than once"),
        (lambda v: v.assign(los=[-1.0, 1.0, 1.0]), "negative length of stay"),
        (lambda v: v.iloc[:0], "no visits"),
    ],
)
def test_validate_rejects_inconsistent_visits(change, message):
    cohort = small_cohort()
    cohort.visits = change(cohort.visits)
    with pytest.raises(CohortError, match=message):
        cohort.validate()


def test_unknown_relation_rejected():
    relations = pd.DataFrame(
        [("A01A", "B01A", "friendly", "both")], columns=["drug_a", "drug_b", "relation", "direction"]
    )
    with pytest.raises(CohortError, match="unknown drug relation"):
        small_cohort(relations=relations).validate()


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CohortError, match="not a cohort folder"):
        Cohort.load(tmp_path)
    folder = small_cohort().save(tmp_path / "c")
    (folder / "visits.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CohortError, match=r"visits.parquet: cannot be read"):
        Cohort.load(folder)
    (folder / "visits.parquet").unlink()
    with pytest.raises(CohortError, match="visits.parquet is missing"):
        Cohort.load(folder)
    (folder / "cohort.json").write_text("{broken")
    with pytest.raises(CohortError, match="corrupt JSON"):
        Cohort.load(folder)
    (folder / "cohort.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CohortError, match="format version 99"):
        Cohort.load(folder)


def test_failed_save_leaves_no_partial_folder(tmp_path):
    cohort = small_cohort()
    cohort.relations = None  # makes the save fail half way
    with pytest.raises(TypeError):
        cohort.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == []


def test_encode_codes_grows_vocabulary_in_first_seen_order():
    rows, vocab = encode_codes([["x", "y"], ["y", "z"]], vocab=["w"])
    assert vocab == ["w", "x", "y", "z"]
    assert rows == [[1, 2], [2, 3]]
