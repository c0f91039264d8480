"""Hardening (issue 23), "one schema for the cohort": every broken file or column of a cohort
folder is refused on load with one CohortError naming the file, the column, a row and the rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import write_cohort

from datamodules.cohort import Cohort, CohortError
from datamodules.errors import MedRecError


@pytest.fixture()
def folder(tmp_path):
    return write_cohort(tmp_path / "cohort")


def tamper_visits(folder, change) -> None:
    visits = pd.read_parquet(folder / "visits.parquet")
    visits = change(visits)
    visits.to_parquet(folder / "visits.parquet", index=False)


def tamper_json(folder, name, change) -> None:
    path = folder / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def refused(folder, pattern: str) -> CohortError:
    with pytest.raises(CohortError, match=pattern) as info:
        Cohort.load(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, MedRecError)
    return info.value


def set_row(column, row, value):
    def change(visits):
        values = visits[column].astype(object).tolist()
        values[row] = value
        visits[column] = values
        return visits

    return change


def test_untouched_cohort_loads(folder):
    assert Cohort.load(folder).summary()["visits"] == 18


# --- the cases -------------------------------------------------------------------
def test_ddi_csv_missing(folder):
    (folder / "ddi.csv").unlink()
    refused(folder, "cohort file ddi.csv is missing")


def test_ddi_codes_outside_the_vocabulary(folder):
    (folder / "ddi.csv").write_text("drug_a,drug_b\nA01A,Z99Z\n")
    refused(folder, r"ddi\.csv row 0 \('A01A', 'Z99Z'\): code 'Z99Z' is not in the medication vocabulary")


def test_cohort_json_a_list(folder):
    (folder / "cohort.json").write_text("[1, 2]")
    refused(folder, r"cohort\.json: must be a JSON object \{\.\.\.\}, got a JSON list")


def test_vocab_json_a_list(folder):
    (folder / "vocab.json").write_text('["A01A", "B01A"]')
    refused(folder, r"vocab\.json: must be a JSON object \{\.\.\.\}, got a JSON list")


def test_duplicated_medication_code(folder):
    tamper_json(folder, "vocab.json", lambda v: {**v, "medication": v["medication"][:3] + ["A01A"]})
    refused(folder, r"vocab\.json vocabulary 'medication' lists code 'A01A' more than once")


def test_medication_names_shorter_than_the_vocabulary(folder):
    tamper_json(folder, "vocab.json", lambda v: {**v, "medication_names": ["one", "two", "three"]})
    refused(folder, r"vocab\.json medication_names has 3 entries, the medication vocabulary 4")


def test_visit_order_as_strings(folder):
    tamper_visits(folder, lambda v: v.assign(visit_order=v["visit_order"].astype(str)))
    refused(folder, r"visits\.parquet column 'visit_order', row \d+ \(visit_id 'P\d-\d'.*must be an integer.*got '\d'")


def test_visit_order_nan(folder):
    tamper_visits(folder, set_row("visit_order", 2, None))
    refused(folder, r"visits\.parquet column 'visit_order', row 2 \(visit_id 'P1-1'.*must not be empty \(null\)")


def test_visit_order_not_unique_within_a_patient(folder):
    tamper_visits(folder, set_row("visit_order", 2, 0))
    refused(folder, r"column 'visit_order', row 2 \(visit_id 'P1-1'.*must be unique within a patient")


def test_diagnoses_as_comma_strings(folder):
    tamper_visits(folder, lambda v: v.assign(diagnoses=v["diagnoses"].map(lambda c: ",".join(map(str, c)))))
    refused(
        folder, r"column 'diagnoses', row 0 \(visit_id 'P0-0'.*must be a list of integer indices into the diagnosis"
    )


def test_diagnoses_as_fractional_floats(folder):
    tamper_visits(folder, lambda v: v.assign(diagnoses=v["diagnoses"].map(lambda c: [x + 0.7 for x in c])))
    refused(folder, r"column 'diagnoses', row 0 .*must be a list of integer indices.*got array\(\[0\.7\]\)")


@pytest.mark.parametrize("column, unit", [("age", "years"), ("los", "days")])
def test_age_and_los_as_strings(folder, column, unit):
    tamper_visits(folder, lambda v: v.assign(**{column: [f"{x}" for x in range(len(v))]}))
    refused(folder, rf"column '{column}', row 0 \(visit_id 'P0-0'.*must be a number of {unit}, not text; got '0'")


def test_null_patient_id(folder):
    tamper_visits(folder, set_row("patient_id", 4, None))
    refused(folder, r"column 'patient_id', row \d+ \(visit_id 'P\d-\d'.*must not be empty \(null\); got (None|nan)")


def test_null_code_list(folder):
    tamper_visits(folder, set_row("medications", 1, None))
    refused(
        folder,
        r"column 'medications', row 1 \(visit_id 'P1-0'.*must be a list of integer indices; got None|"
        r"column 'medications', row 1 \(visit_id 'P1-0'.*must be a list of integer indices into the medication",
    )


def test_infinite_length_of_stay(folder):
    tamper_visits(folder, lambda v: v.assign(los=[np.inf] + [2.0] * (len(v) - 1)))
    refused(folder, r"column 'los', row 0 \(visit_id 'P0-0'.*must be finite and within \[0, 3650\] days.*got inf")


@pytest.mark.parametrize("age", [-40.0, 40_000.0])
def test_implausible_age(folder, age):
    tamper_visits(folder, set_row("age", 3, age))
    refused(folder, rf"column 'age', row 3 .*must be finite and within \[0, 150\] years.*got {age}")


def test_smiles_json_a_list(folder):
    (folder / "smiles.json").write_text('["CCO"]')
    refused(folder, r"smiles\.json: must be a JSON object \{\.\.\.\}, got a JSON list")


# --- the rest of the schema --------------------------------------------------------------
def test_gender_outside_its_set(folder):
    tamper_visits(folder, lambda v: v.assign(gender=["X"] * len(v)))
    refused(folder, r"column 'gender', row 0 .*must be one of \('F', 'M'\); got 'X'")


def test_relation_direction_outside_its_set(folder):
    (folder / "drug_relations.csv").write_text("drug_a,drug_b,relation,direction\nA01A,B01A,synergy,sideways\n")
    refused(
        folder, r"drug_relations\.csv column 'direction', row 0 \(A01A, B01A\): unknown direction\(s\) \['sideways'\]"
    )


def test_relation_code_outside_the_vocabulary(folder):
    (folder / "drug_relations.csv").write_text("drug_a,drug_b,relation,direction\nA01A,Q00Q,synergy,both\n")
    refused(folder, r"drug_relations\.csv column 'drug_b', row 0: code 'Q00Q' is not in the medication vocabulary")


def test_vocabulary_of_non_strings(folder):
    tamper_json(folder, "vocab.json", lambda v: {**v, "diagnosis": [1, 2, 3]})
    refused(folder, r"vocab\.json vocabulary 'diagnosis' must be a list of code strings; got 1")


def test_smiles_entry_not_a_list(folder):
    (folder / "smiles.json").write_text('{"A01A": "CCO"}')
    refused(folder, r"smiles\.json entry 'A01A' must be a list of SMILES strings, got 'CCO'")


def test_code_index_outside_the_vocabulary_names_the_row(folder):
    tamper_visits(folder, set_row("procedures", 5, np.array([7], dtype=np.int32)))
    refused(
        folder,
        r"column 'procedures', row 5 \(visit_id '.*'\): holds index 7 outside the procedure vocabulary of size 2",
    )


def test_training_on_a_broken_cohort_is_one_error_line(folder, capsys, tmp_path, monkeypatch):
    from pathlib import Path

    from train import main

    monkeypatch.chdir(tmp_path)
    tamper_visits(folder, lambda v: v.assign(los=[np.inf] + [2.0] * (len(v) - 1)))
    config = Path(__file__).resolve().parents[1] / "configs" / "miranda.yaml"
    with pytest.raises(SystemExit) as info:
        main(["fit", f"--config={config}", f"--data.init_args.root={folder}", "--trainer.fast_dev_run=true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("medrec: error: ")]
    assert "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith(f"medrec: error: {folder}: visits.parquet column 'los', row 0")
