"""Sanity checks for the clinical knowledge tables shipped in ``datamodules/resources``.

These tables (real WHO ATC level-3 classes with real member molecules, class-level drug-drug
relations, and clinical conditions with real ICD-9-CM codes) drive the synthetic cohort
generator, so they are validated structurally here: every SMILES parses, every code is
well-formed, and every cross-reference resolves.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from rdkit import Chem, RDLogger

RESOURCES = Path(__file__).resolve().parents[1] / "datamodules" / "resources"
ATC3_RE = re.compile(r"^[A-Z][0-9]{2}[A-Z]$")
# MIMIC-III style ICD-9-CM codes: no dot. Diagnoses are 3-5 digits, V codes (V + 2-4 digits)
# or E codes (E + 3-4 digits); procedures are 2-4 digits.
DIAGNOSIS_RE = re.compile(r"^(?:\d{3,5}|V\d{2,4}|E\d{3,4})$")
PROCEDURE_RE = re.compile(r"^\d{2,4}$")
LAB_RE = re.compile(r"^[a-z][a-z0-9_]*:(?:high|low)$")
RELATIONS = {"antagonism", "synergy"}
DIRECTIONS = {"both", "a->b"}


def _read_csv(name: str) -> list[dict[str, str]]:
    with (RESOURCES / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def molecules() -> list[dict[str, str]]:
    return _read_csv("atc3_molecules.csv")


@pytest.fixture(scope="module")
def classes(molecules) -> set[str]:
    return {row["atc3"] for row in molecules}


@pytest.fixture(scope="module")
def relations() -> list[dict[str, str]]:
    return _read_csv("atc3_relations.csv")


@pytest.fixture(scope="module")
def conditions() -> list[dict]:
    with (RESOURCES / "conditions.json").open() as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- molecules


def test_molecule_columns(molecules):
    assert molecules, "atc3_molecules.csv is empty"
    assert list(molecules[0]) == ["atc3", "class_name", "drug_name", "smiles"]
    for row in molecules:
        assert all(row[k] and row[k].strip() == row[k] for k in row), row


def test_atc3_codes_well_formed(molecules):
    bad = [row["atc3"] for row in molecules if not ATC3_RE.match(row["atc3"])]
    assert not bad, f"malformed ATC3 codes: {bad}"


def test_enough_classes_each_with_a_molecule(molecules, classes):
    assert len(classes) >= 90
    counts = Counter(row["atc3"] for row in molecules)
    assert all(1 <= n <= 3 for n in counts.values()), counts


def test_one_class_name_per_code(molecules):
    names: dict[str, set[str]] = {}
    for row in molecules:
        names.setdefault(row["atc3"], set()).add(row["class_name"])
    assert all(len(v) == 1 for v in names.values()), {k: v for k, v in names.items() if len(v) > 1}


def test_drug_names_and_structures_unique(molecules):
    names = Counter(row["drug_name"].lower() for row in molecules)
    assert not [n for n, c in names.items() if c > 1]
    smiles = Counter(row["smiles"] for row in molecules)
    assert not [s for s, c in smiles.items() if c > 1]


def test_every_smiles_parses_and_is_canonical(molecules):
    RDLogger.DisableLog("rdApp.*")
    try:
        for row in molecules:
            mol = Chem.MolFromSmiles(row["smiles"])
            assert mol is not None, f"{row['drug_name']}: SMILES does not parse"
            assert mol.GetNumHeavyAtoms() > 0
            assert Chem.MolToSmiles(mol) == row["smiles"], f"{row['drug_name']}: SMILES not canonical"
    finally:
        RDLogger.EnableLog("rdApp.*")


def test_molecules_are_small(molecules):
    # no huge biologics (insulin, heparin, vancomycin-sized peptides) in the table
    for row in molecules:
        mol = Chem.MolFromSmiles(row["smiles"])
        assert mol.GetNumHeavyAtoms() <= 80, row["drug_name"]


def test_known_anchor_molecules(molecules):
    by_name = {row["drug_name"]: row for row in molecules}
    expected = {
        "warfarin": ("B01A", "CC(=O)CC(c1ccccc1)c1c(O)c2ccccc2oc1=O"),
        "furosemide": ("C03C", "NS(=O)(=O)c1cc(C(=O)O)c(NCc2ccco2)cc1Cl"),
        "metoprolol": ("C07A", "COCCc1ccc(OCC(O)CNC(C)C)cc1"),
        "paracetamol": ("N02B", "CC(=O)Nc1ccc(O)cc1"),
    }
    for name, (code, smi) in expected.items():
        assert by_name[name]["atc3"] == code
        assert by_name[name]["smiles"] == Chem.MolToSmiles(Chem.MolFromSmiles(smi))


# --------------------------------------------------------------------------- relations


def test_relation_columns(relations):
    assert relations
    assert list(relations[0]) == ["drug_a", "drug_b", "relation", "direction", "note"]


def test_relations_reference_known_classes(relations, classes):
    for row in relations:
        assert row["drug_a"] in classes, row
        assert row["drug_b"] in classes, row
        assert row["drug_a"] != row["drug_b"], f"self pair: {row}"
        assert row["relation"] in RELATIONS, row
        assert row["direction"] in DIRECTIONS, row
        assert row["note"].strip(), row


def test_relations_have_no_duplicate_pairs(relations):
    pairs = Counter(frozenset((row["drug_a"], row["drug_b"])) for row in relations)
    assert not [tuple(sorted(p)) for p, c in pairs.items() if c > 1]


def test_relation_counts(relations):
    counts = Counter(row["relation"] for row in relations)
    assert 40 <= counts["antagonism"] <= 80
    assert 15 <= counts["synergy"] <= 40


def test_core_interactions_present(relations):
    labelled = {frozenset((r["drug_a"], r["drug_b"])): r["relation"] for r in relations}
    assert labelled[frozenset(("B01A", "M01A"))] == "antagonism"
    assert labelled[frozenset(("N02A", "N05B"))] == "antagonism"
    assert labelled[frozenset(("C09A", "C03D"))] == "antagonism"
    assert labelled[frozenset(("C09A", "C03A"))] == "synergy"
    assert labelled[frozenset(("J01C", "J01G"))] == "synergy"


# --------------------------------------------------------------------------- conditions


def test_condition_schema(conditions):
    assert len(conditions) >= 35
    keys = {
        "name",
        "diagnoses",
        "procedures",
        "drugs",
        "alternatives",
        "labs",
        "chronic",
        "prevalence",
        "base_los_days",
    }
    names = [c["name"] for c in conditions]
    assert len(names) == len(set(names)), "duplicate condition names"
    for c in conditions:
        assert set(c) == keys, c["name"]
        assert isinstance(c["name"], str) and c["name"]
        assert isinstance(c["chronic"], bool)
        assert isinstance(c["prevalence"], float) and c["prevalence"] > 0
        assert isinstance(c["base_los_days"], float) and c["base_los_days"] > 0
        assert 3 <= len(c["diagnoses"]) <= 8, c["name"]
        assert 0 <= len(c["procedures"]) <= 3, c["name"]
        assert 2 <= len(c["drugs"]) <= 5, c["name"]
        assert 0 <= len(c["labs"]) <= 3, c["name"]
        for field in ("diagnoses", "procedures", "drugs", "labs"):
            assert len(c[field]) == len(set(c[field])), (c["name"], field)


def test_condition_icd_codes_well_formed(conditions):
    for c in conditions:
        for code in c["diagnoses"]:
            assert isinstance(code, str) and DIAGNOSIS_RE.match(code), (c["name"], code)
        for code in c["procedures"]:
            assert isinstance(code, str) and PROCEDURE_RE.match(code), (c["name"], code)


def test_condition_drugs_reference_known_classes(conditions, classes):
    for c in conditions:
        for code in c["drugs"]:
            assert code in classes, (c["name"], code)
        for drug, alt in c["alternatives"].items():
            assert drug in c["drugs"], (c["name"], drug)
            assert alt in classes, (c["name"], alt)
            assert alt != drug and alt not in c["drugs"], (c["name"], drug, alt)


def test_condition_labs_well_formed(conditions):
    for c in conditions:
        for lab in c["labs"]:
            assert LAB_RE.match(lab), (c["name"], lab)


def test_conditions_give_rise_to_adverse_pairs(conditions, relations):
    """Co-occurring conditions must be able to produce labelled adverse DDIs."""
    adverse = {frozenset((r["drug_a"], r["drug_b"])) for r in relations if r["relation"] == "antagonism"}
    reachable = set()
    for i, c1 in enumerate(conditions):
        for c2 in conditions[i:]:
            reachable |= {frozenset((a, b)) for a in c1["drugs"] for b in c2["drugs"] if a != b} & adverse
    assert len(reachable) >= 20
    assert frozenset(("B01A", "M01A")) in reachable
