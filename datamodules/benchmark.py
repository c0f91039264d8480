"""Importer for the SafeDrug/GAMENet processed MIMIC-III benchmark (``records_final.pkl`` & co.).

The benchmark carries diagnoses, procedures and medications only: no time, age, labs or
length of stay. Its ``ehr_adj_final.pkl`` was built from all records (test visits included),
so it is deliberately not imported: DataModules rebuild the co-prescription graph from the
training split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.cohort import Cohort, CohortError
from datamodules.knowledge import atc3_medication_names
from datamodules.safe_pickle import load_pickle

BENCHMARK_FILES = ("records_final.pkl", "voc_final.pkl", "ddi_A_final.pkl")


def is_benchmark_folder(folder: str | Path) -> bool:
    return (Path(folder) / "records_final.pkl").is_file()


def _load_pickle(path: Path):
    """Any of the family's pickles, through the restricted reader: no file can run code."""
    return load_pickle(path, what="a benchmark pickle")


def _load_vocabulary(path: Path) -> dict[str, list[str]]:
    """voc_final.pkl: a (dill) pickle of the authors' ``Voc`` class, often stored by value with
    its code; the restricted reader keeps only the instances' ``idx2word`` dicts."""
    raw = load_pickle(path, what="the benchmark vocabulary")
    if not isinstance(raw, dict):
        raise CohortError(f"{path}: expected a dict of vocabularies, got {type(raw).__name__}")
    out = {}
    for key, name in (("diag_voc", "diagnosis"), ("pro_voc", "procedure"), ("med_voc", "medication")):
        if key not in raw:
            raise CohortError(f"{path}: vocabulary {key!r} missing (found {sorted(raw)})")
        idx2word = getattr(raw[key], "idx2word", None)
        if not isinstance(idx2word, dict) or sorted(idx2word) != list(range(len(idx2word))):
            raise CohortError(f"{path}: vocabulary {key!r} has no idx2word dict indexed 0..n-1")
        out[name] = [str(idx2word[i]) for i in range(len(idx2word))]
    return out


def read_benchmark(folder: str | Path) -> Cohort:
    """Read the benchmark pickles into a Cohort (patient i = i-th record, in file order)."""
    folder = Path(folder)
    for name in BENCHMARK_FILES:
        if not (folder / name).is_file():
            raise CohortError(f"{folder}: benchmark file {name} is missing")
    records = _load_pickle(folder / "records_final.pkl")
    vocab = _load_vocabulary(folder / "voc_final.pkl")
    ddi = np.asarray(_load_pickle(folder / "ddi_A_final.pkl"))
    smiles_path = folder / "atc3toSMILES.pkl"
    smiles = _load_pickle(smiles_path) if smiles_path.is_file() else {}

    n_med = len(vocab["medication"])
    if ddi.shape != (n_med, n_med):
        raise CohortError(f"{folder / 'ddi_A_final.pkl'}: shape {ddi.shape} does not match {n_med} drugs")
    if not isinstance(records, list):
        raise CohortError(f"{folder / 'records_final.pkl'}: expected a list of patients, got {type(records).__name__}")

    rows = []
    width = len(str(len(records)))
    for p, patient in enumerate(records):
        if not patient:
            raise CohortError(f"{folder / 'records_final.pkl'}: patient {p} has no visits")
        for t, visit in enumerate(patient):
            if len(visit) < 3:
                raise CohortError(
                    f"{folder / 'records_final.pkl'}: patient {p} visit {t} is not [diagnoses, procedures, medications]"
                )
            rows.append(
                {
                    "patient_id": f"P{p:0{width}d}",
                    "visit_id": f"P{p:0{width}d}-{t}",
                    "visit_order": t,
                    "diagnoses": [int(c) for c in visit[0]],
                    "procedures": [int(c) for c in visit[1]],
                    "medications": [int(c) for c in visit[2]],
                }
            )
    ii, jj = np.nonzero(np.triu(np.maximum(ddi, ddi.T), k=1))
    meds = vocab["medication"]
    cohort = Cohort(
        visits=pd.DataFrame(rows),
        vocab={**vocab, "lab": []},
        ddi_pairs=[(meds[i], meds[j]) for i, j in zip(ii, jj)],
        smiles={code: list(smiles.get(code, [])) for code in meds},
        # The benchmark's only relation knowledge is adverse DDI, which DPR reads as antagonism.
        relations=pd.DataFrame(
            [(meds[i], meds[j], "antagonism", "both") for i, j in zip(ii, jj)],
            columns=["drug_a", "drug_b", "relation", "direction"],
        ),
        # The pickles carry ATC3 codes only; their WHO class names come from the shipped table.
        medication_names=atc3_medication_names(meds),
        source=f"benchmark:{folder.name}",
    )
    return cohort.validate(where=str(folder))
