"""The GAMENet family's variations of the processed benchmark (issue 24, item 3), each written here
the way the papers' code writes it, then one release with all of them at once trained end to end.

What the releases do (their public repositories): GAMENet's processing for DMNC puts
``seperator`` and ``decoder_point`` first in every vocabulary and builds ``ddi_A_final.pkl`` over
the whole medication vocabulary; seq2seq variants put ``SOS``/``EOS`` first in the medication
vocabulary; the SafeDrug paper's release has ``idx2drug.pkl`` (ATC3 -> *set* of SMILES, plus
``'seperator': {}`` entries) instead of ``atc3toSMILES.pkl``; GAMENet ships ``data_final.pkl``
(a pandas DataFrame) beside ``records_final.pkl``; SafeDrug's ``ddi_mask_H.pkl`` has as many
columns as its BRICS run found. Vocabularies and matrices are written as old dill did under
Python 3.6/3.7 (the ``Voc`` class by value with a 15-argument code object).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_onboarding import _Call, _load_type, write_ddi_matrix, write_old_dill, write_vocabularies

from datamodules.benchmark import read_benchmark
from datamodules.cohort import CohortError
from datamodules.molecules import parse_smiles
from datamodules.safe_pickle import UnsafePickleError, load_pickle
from datamodules.sources import detect_source, resolve_cohort
from train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
GAMENET_TOKENS = ("seperator", "decoder_point")
SMILES = {
    "N02B": ["CC(=O)Nc1ccc(O)cc1", "CC(=O)Oc1ccccc1C(=O)O"],
    "A01A": ["[Na+].[F-]"],  # a salt: one SMILES, two fragments
    "B01A": ["CC(=O)CC(c1ccccc1)c1c(O)c2ccccc2oc1=O"],
}


def write_idx2drug(path: Path, smiles: dict[str, list[str]]) -> None:
    """The SafeDrug paper release's idx2drug.pkl: ATC3 -> set (dill's ``_load_type('set')``), and
    an empty dict for each special token, as its get_SMILES.py wrote it."""
    data = {token: {} for token in GAMENET_TOKENS}
    data.update({code: _Call(_load_type("set"), list(values)) for code, values in smiles.items()})
    write_old_dill(path, data)


def write_release(folder: Path, records, meds, diag=("4019", "2724"), proc=("3893",), specials=(), ddi_span=None):
    """A release whose vocabularies start with ``specials`` (records index the files' vocabularies);
    the DDI matrix pairs N02B-B01A and spans ``ddi_span`` (default: the full medication vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    full = [*specials, *meds]
    write_vocabularies(folder / "voc_final.pkl", [*specials, *diag], [*specials, *proc], full)
    with open(folder / "records_final.pkl", "wb") as fh:
        pickle.dump(records, fh)
    write_ddi_matrix(folder / "ddi_A_final.pkl", list(ddi_span or full), [("N02B", "B01A")])
    return folder


def medications(cohort) -> list[list[int]]:
    return [list(m) for m in cohort.visits["medications"]]


# --- special tokens --------------------------------------------------------------------------
def test_gamenet_separator_tokens_are_dropped_and_indices_renumbered(tmp_path):
    # file indices: diag 2=4019 3=2724, proc 2=3893, med 2=N02B 3=A01A 4=B01A
    records = [[[[2], [2], [2, 3]], [[3, 2], [2], [4]]], [[[3], [2], [3, 4]]]]
    folder = write_release(tmp_path / "gamenet", records, ["N02B", "A01A", "B01A"], specials=GAMENET_TOKENS)
    cohort = read_benchmark(folder)
    assert cohort.vocab["medication"] == ["N02B", "A01A", "B01A"]
    assert cohort.vocab["diagnosis"] == ["4019", "2724"] and cohort.vocab["procedure"] == ["3893"]
    assert medications(cohort) == [[0, 1], [2], [1, 2]]
    assert [list(d) for d in cohort.visits["diagnoses"]] == [[0], [1, 0], [1]]
    assert [list(p) for p in cohort.visits["procedures"]] == [[0], [0], [0]]
    # the 5x5 matrix lost the tokens' rows and columns; the pair keeps its drugs
    assert cohort.ddi_pairs == [("N02B", "B01A")] and cohort.ddi_adjacency()[0, 2] == 1
    assert len(cohort.medication_names) == 3


@pytest.mark.parametrize("specials", [("SOS", "EOS"), ("<pad>",), ("[SEP]", "PAD")])
@pytest.mark.parametrize("span", ["full vocabulary", "codes only"])
def test_sequence_tokens_in_the_medication_vocabulary(tmp_path, specials, span):
    meds = ["N02B", "A01A", "B01A"]
    k = len(specials)
    records = [[[[0], [0], [k, k + 2]], [[1], [0], [k + 1]]]]
    folder = tmp_path / "seq"
    write_release(folder, records, meds, ddi_span=meds if span == "codes only" else [*specials, *meds])
    # only the medication vocabulary carries the tokens (as COGNet-style processing adds SOS/EOS)
    write_vocabularies(folder / "voc_final.pkl", ["4019", "2724"], ["3893"], [*specials, *meds])
    cohort = read_benchmark(folder)
    assert cohort.vocab["medication"] == meds and cohort.vocab["diagnosis"] == ["4019", "2724"]
    assert medications(cohort) == [[0, 2], [1]]
    assert cohort.ddi_pairs == [("N02B", "B01A")]


def test_records_that_use_a_special_token_are_refused(tmp_path):
    records = [[[[2], [2], [2]], [[2], [2], [0, 3]]]]  # med index 0 is 'seperator'
    folder = write_release(tmp_path / "used", records, ["N02B", "A01A", "B01A"], specials=GAMENET_TOKENS)
    with pytest.raises(CohortError) as info:
        read_benchmark(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{folder / 'records_final.pkl'}: patient 0 visit 1")
    assert "'seperator' (index 0 of med_voc in voc_final.pkl), a special token" in message


# --- molecules -------------------------------------------------------------------------------
def test_idx2drug_sets_of_smiles_instead_of_atc3tosmiles(tmp_path):
    folder = write_release(tmp_path / "paper", [[[[0], [0], [0, 1, 2]]]], ["N02B", "A01A", "B01A"])
    write_idx2drug(folder / "idx2drug.pkl", SMILES)
    cohort = read_benchmark(folder)
    # a set has no order: sorted, so the same file always gives the same molecules
    assert cohort.smiles == {"N02B": sorted(SMILES["N02B"]), "A01A": ["[Na+].[F-]"], "B01A": SMILES["B01A"]}
    assert cohort.summary()["drugs_with_smiles"] == 3
    assert parse_smiles("[Na+].[F-]") is not None  # a multi-fragment entry is one molecule
    # atc3toSMILES.pkl, where a release has both, is the one read (lists keep their order)
    with open(folder / "atc3toSMILES.pkl", "wb") as fh:
        pickle.dump({"N02B": ["CCO"], "A01A": ["C"]}, fh)
    assert read_benchmark(folder).smiles == {"N02B": ["CCO"], "A01A": ["C"], "B01A": []}


# --- files that are not read -----------------------------------------------------------------
def test_data_final_and_a_mask_of_another_size_are_not_read(tmp_path, caplog):
    folder = write_release(tmp_path / "gamenet", [[[[0], [0], [0, 2]]], [[[1], [0], [1]]]], ["N02B", "A01A", "B01A"])
    pd.DataFrame({"SUBJECT_ID": [1, 2], "NDC": [["N02B", "B01A"], ["A01A"]]}).to_pickle(folder / "data_final.pkl")
    write_old_dill(folder / "ddi_mask_H.pkl", np.ones((7, 3)))  # not 3 drugs x medrec's substructures
    with pytest.raises(UnsafePickleError, match="data_final.pkl: refusing to load pandas"):
        load_pickle(folder / "data_final.pkl")  # why it is never read: a pandas pickle could run code
    assert detect_source(folder) == "benchmark"
    with caplog.at_level(logging.INFO, logger="datamodules.benchmark"):
        cohort = resolve_cohort(folder, cache_dir=tmp_path / "cache")
    assert cohort.summary()["patients"] == 2 and medications(cohort) == [[0, 2], [1]]
    (note,) = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert "data_final.pkl (a pandas table" in note and "ddi_mask_H.pkl (medrec rebuilds" in note


# --- visits with extra fields ----------------------------------------------------------------
def test_extra_visit_fields_are_ignored_with_one_warning(tmp_path, caplog):
    records = [[[[0], [0], [0], [17, 3], "note"], [[1], [0], [1, 2]]], [[[0, 1], [0], [2], 5.5]]]
    folder = write_release(tmp_path / "extra", records, ["N02B", "A01A", "B01A"])
    with caplog.at_level(logging.WARNING, logger="datamodules.benchmark"):
        cohort = read_benchmark(folder)
    assert medications(cohort) == [[0], [1, 2], [2]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{folder / 'records_final.pkl'}: 2 of 3 visits carry fields beyond [diagnoses, procedures, "
        "medications]; only the first three were imported"
    ]


# --- malformed variants ----------------------------------------------------------------------
def _string_codes(folder):
    with open(folder / "records_final.pkl", "wb") as fh:
        pickle.dump([[[["4019"], [2], [2]]]], fh)


def _visit_not_a_list(folder):
    with open(folder / "records_final.pkl", "wb") as fh:
        pickle.dump([[7]], fh)


def _fractional_code(folder):
    with open(folder / "records_final.pkl", "wb") as fh:
        pickle.dump([[[[2], [2], [2.5]]]], fh)


def _idx2drug_not_a_dict(folder):
    write_old_dill(folder / "idx2drug.pkl", ["CCO"])


def _idx2drug_number(folder):
    write_old_dill(folder / "idx2drug.pkl", {"N02B": 3})


def _ddi_of_another_size(folder):
    write_ddi_matrix(folder / "ddi_A_final.pkl", ["N02B", "A01A", "B01A", "X", "Y", "Z"], [])


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (_string_codes, "records_final.pkl", "patient 0 visit 0: diag_voc codes must be integer indices, got '4019'"),
        (_visit_not_a_list, "records_final.pkl", r"patient 0 visit 0 is not \[diagnoses, procedures, medications\]"),
        (_fractional_code, "records_final.pkl", "med_voc codes must be integer indices, got 2.5"),
        (_idx2drug_not_a_dict, "idx2drug.pkl", "expected a dict ATC3 -> SMILES, got list"),
        (_idx2drug_number, "idx2drug.pkl", "'N02B' maps to a int, expected a list or set of SMILES"),
        (
            _ddi_of_another_size,
            "ddi_A_final.pkl",
            r"shape \(6, 6\) does not match 3 drugs: med_voc of voc_final.pkl has 5 entries "
            r"\(3 drugs and 2 special tokens\)",
        ),
    ],
)
def test_a_malformed_variant_is_one_error_line_naming_the_file(tmp_path, damage, file, message):
    folder = write_release(tmp_path / "bad", [[[[2], [2], [2]]]], ["N02B", "A01A", "B01A"], specials=GAMENET_TOKENS)
    damage(folder)
    with pytest.raises(CohortError, match=message) as info:
        read_benchmark(folder)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(folder / file))


# --- everything at once, trained -------------------------------------------------------------
def gamenet_family_release(folder: Path, n_patients: int = 12) -> Path:
    """Every variation above in one folder: separator tokens in all vocabularies and in the DDI
    matrix, idx2drug.pkl sets, data_final.pkl, a mask of another size, a weighted
    ehr_adj_final.pkl and visits with an extra field."""
    meds = ["N02B", "A01A", "B01A", "C07A"]
    smiles = {**SMILES, "C07A": ["CC(C)NCC(O)COc1cccc2ccccc12"]}
    diag, proc = ["4019", "2724", "25000", "4280"], ["3893", "9604"]
    rng = np.random.default_rng(0)
    records = []
    for p in range(n_patients):
        patient = []
        for _ in range(1 + p % 3):
            visit = [
                sorted((2 + rng.choice(len(diag), size=2, replace=False)).tolist()),
                [2 + int(rng.integers(len(proc)))],
                sorted((2 + rng.choice(len(meds), size=2, replace=False)).tolist()),
            ]
            patient.append(visit + [[int(rng.integers(100))]] if p % 2 else visit)
        records.append(patient)
    write_release(folder, records, meds, diag=diag, proc=proc, specials=GAMENET_TOKENS)
    write_idx2drug(folder / "idx2drug.pkl", smiles)
    pd.DataFrame({"SUBJECT_ID": range(n_patients)}).to_pickle(folder / "data_final.pkl")
    write_old_dill(folder / "ddi_mask_H.pkl", np.ones((len(meds) + 2, 9)))
    write_old_dill(folder / "ehr_adj_final.pkl", np.full((len(meds) + 2, len(meds) + 2), 3.0))
    return folder


def test_a_gamenet_family_release_trains_safedrug(tmp_path, monkeypatch, caplog):
    folder = gamenet_family_release(tmp_path / "release")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        train_main(["fit", "--config", str(ROOT / "configs" / "safedrug.yaml"),
                    f"--data.init_args.root={folder}", "--trainer.fast_dev_run=true"])  # fmt: skip
    cohort = resolve_cohort(folder)  # the import the fit cached
    assert cohort.vocab["medication"] == ["N02B", "A01A", "B01A", "C07A"]
    assert len(cohort.vocab["diagnosis"]) == 4 and len(cohort.vocab["procedure"]) == 2
    assert cohort.summary()["drugs_with_smiles"] == 4 and cohort.ddi_pairs == [("N02B", "B01A")]
    assert cohort.summary()["patients"] == 12 and len(cohort.visits) == 24
    messages = [r.getMessage() for r in caplog.records]
    assert sum("12 of 24 visits carry fields beyond" in m for m in messages) == 1
    assert not [m for m in messages if "fallback" in m or "could not parse" in m]


def test_an_import_by_an_older_importer_is_not_served_from_the_cache(tmp_path, monkeypatch):
    """A release imported before special tokens were dropped would keep 'seperator' as a drug."""
    import datamodules.benchmark as benchmark

    folder = write_release(
        tmp_path / "gamenet", [[[[2], [2], [2, 4]]]], ["N02B", "A01A", "B01A"], specials=GAMENET_TOKENS
    )
    monkeypatch.setattr(benchmark, "IMPORT_VERSION", 1)
    resolve_cohort(folder, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    cohort = resolve_cohort(folder, cache_dir=tmp_path / "cache")
    assert cohort.vocab["medication"] == ["N02B", "A01A", "B01A"]
    assert len(list((tmp_path / "cache").glob("benchmark-gamenet-*"))) == 2
