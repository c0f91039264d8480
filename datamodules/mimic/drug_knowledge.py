"""Drug knowledge from public sources: adverse DDI pairs (TWOSIDES) and molecules (DrugBank).

* DDI (SafeDrug/GAMENet ``get_ddi_matrix``): TWOSIDES ``drug-DDI.csv`` rows are CID pairs
  labelled with a side-effect type. Types are ranked by row count and the reference keeps the
  *last* ``top_k`` = 40 of that ranking (the rarest types, which the papers call the most
  severe). CIDs become ATC3 classes through ``drug-atc.csv`` (``CID...,ATC,ATC,...``, no
  header; first four characters of each ATC code), and every pair of distinct classes in the
  medication vocabulary is an adverse pair.
* SMILES (``atc3toSMILES``): the drug names prescribed under each ATC3 class are looked up in
  DrugBank's ``drugbank_drugs_info.csv`` (``name`` -> ``moldb_smiles``); up to three molecules
  per class. Names match case-insensitively, and the most-prescribed names are tried first so
  the choice is deterministic (the reference took an arbitrary three from a Python set).

* Processed alternatives, from the papers' releases, used when the files above are absent:
  SMILES from ``atc3toSMILES.pkl`` (SafeDrug) or ``idx2drug.pkl`` (the SafeDrug paper's
  release), both a dict ATC3 -> list or set of SMILES; DDI pairs from ``ddi_A_final.pkl``
  (numpy adjacency over the release's medication vocabulary) with that release's
  ``voc_final.pkl`` (``med_voc.idx2word`` names each row). Entries of the vocabulary that are
  not ATC3 codes (GAMENet's ``seperator``/``decoder_point`` tokens) are skipped.

The BRICS substructure mask SafeDrug needs is derived from these SMILES by the molecule
featurisation, not stored in the cohort.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from datamodules.cohort import CohortError
from datamodules.mimic.mappings import ATC3_PATTERN, read_medication_vocabulary, read_third_party_pickle
from datamodules.mimic.tables import csv_scan, read_header, sql_ident

TWOSIDES_COLUMNS = ("STITCH 1", "STITCH 2", "Polypharmacy Side Effect", "Side Effect Name")


def read_cid_atc3(path: Path) -> dict[str, set[str]]:
    """``drug-atc.csv``: CID -> set of ATC3 classes."""
    out: dict[str, set[str]] = defaultdict(set)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CohortError(f"{path}: cannot be read ({type(err).__name__})") from None
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0]:
            continue
        for atc in parts[1:]:
            if len(atc) >= 4:
                out[parts[0]].add(atc[:4].upper())
    if not out:
        raise CohortError(f"{path}: no 'CID...,ATC' lines found")
    return dict(out)


def twosides_ddi_pairs(
    con: duckdb.DuckDBPyConnection,
    ddi_path: Path,
    cid_atc_path: Path,
    medications: list[str],
    top_k: int = 40,
    keep: str = "tail",
) -> tuple[list[tuple[str, str]], dict]:
    """Adverse ATC3 pairs among ``medications`` and a report of what was kept."""
    header = read_header(con, ddi_path)
    missing = [c for c in TWOSIDES_COLUMNS if c not in header]
    if missing:
        raise CohortError(f"{ddi_path}: missing TWOSIDES column(s) {missing} (has {header})")
    s1, s2, se_id, se_name = (sql_ident(c) for c in TWOSIDES_COLUMNS)
    scan = csv_scan(ddi_path)
    try:
        counts = con.execute(
            f"SELECT {se_id} AS type, {se_name} AS name, count(*) AS n FROM {scan} "
            f"GROUP BY ALL ORDER BY n DESC, type, name"
        ).fetchall()
    except duckdb.Error as err:
        raise CohortError(f"{ddi_path}: cannot be read ({str(err).splitlines()[0]})") from None
    if not counts:
        raise CohortError(f"{ddi_path}: table is empty")
    chosen = counts[-top_k:] if keep == "tail" else counts[:top_k]
    names = sorted({name for _, name, _ in chosen if name is not None})
    con.execute("CREATE OR REPLACE TEMP TABLE ddi_names (name VARCHAR)")
    con.executemany("INSERT INTO ddi_names VALUES (?)", [(n,) for n in names])
    cid_pairs = con.execute(
        f"SELECT DISTINCT trim({s1}), trim({s2}) FROM {scan} WHERE {se_name} IN (SELECT name FROM ddi_names)"
    ).fetchall()
    cid_atc3 = read_cid_atc3(cid_atc_path)
    wanted = set(medications)
    pairs = set()
    for a, b in cid_pairs:
        for x in cid_atc3.get(a, ()):
            if x not in wanted:
                continue
            for y in cid_atc3.get(b, ()):
                if y in wanted and x != y:
                    pairs.add((min(x, y), max(x, y)))
    report = {
        "side_effect_types": len(counts),
        "kept_types": len(chosen),
        "kept_rule": f"{keep} {top_k} by row count",
        "cid_pairs": len(cid_pairs),
        "atc3_pairs": len(pairs),
    }
    return sorted(pairs), report


def read_drugbank_smiles(path: Path) -> dict[str, str]:
    """lower-cased DrugBank name -> SMILES (rows without SMILES skipped)."""
    try:
        frame = pd.read_csv(path, dtype=str, usecols=lambda c: c in ("name", "moldb_smiles"), keep_default_na=False)
    except Exception as err:
        raise CohortError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err})") from None
    missing = [c for c in ("name", "moldb_smiles") if c not in frame.columns]
    if missing:
        raise CohortError(f"{path}: missing DrugBank column(s) {missing}")
    frame = frame[(frame["moldb_smiles"].str.strip() != "") & (frame["name"].str.strip() != "")]
    keys = frame["name"].str.strip().str.lower()
    return dict(zip(keys, frame["moldb_smiles"].str.strip()))


def smiles_per_class(
    drug_names: pd.DataFrame, name_to_smiles: dict[str, str], per_class: int = 3
) -> dict[str, list[str]]:
    """``drug_names`` has columns atc3, name (lower-cased), rows (prescription count)."""
    ordered = drug_names.sort_values(["atc3", "rows", "name"], ascending=[True, False, True])
    out: dict[str, list[str]] = {}
    for atc3, group in ordered.groupby("atc3", sort=True):
        chosen: list[str] = []
        for name in group["name"]:
            smiles = name_to_smiles.get(name)
            if smiles and smiles not in chosen:
                chosen.append(smiles)
                if len(chosen) == per_class:
                    break
        if chosen:
            out[atc3] = chosen
    return out


def read_smiles_pickle(path: Path, per_class: int = 3) -> dict[str, list[str]]:
    """``atc3toSMILES.pkl`` / ``idx2drug.pkl``: ATC3 -> up to ``per_class`` SMILES.

    A list keeps its order (the release's choice); a set, whose order Python does not fix, is
    sorted so the same file always gives the same molecules.
    """
    raw = read_third_party_pickle(path)
    if not isinstance(raw, dict):
        raise CohortError(f"{path}: expected a dict ATC3 -> SMILES, got {type(raw).__name__}")
    out: dict[str, list[str]] = {}
    for code, value in raw.items():
        code = str(code).strip().upper()
        if not ATC3_PATTERN.match(code[:4]):
            continue  # the releases' special tokens ('seperator', 'decoder_point')
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, (set, frozenset)):
            value = sorted(value, key=str)
        elif not isinstance(value, (list, tuple)):
            raise CohortError(f"{path}: {code!r} maps to a {type(value).__name__}, expected SMILES strings")
        smiles = [s.strip() for s in value if isinstance(s, str) and s.strip()]
        if smiles:
            out.setdefault(code[:4], list(dict.fromkeys(smiles))[:per_class])
    if not out:
        raise CohortError(f"{path}: holds no SMILES (expected a dict ATC3 -> list of SMILES)")
    return out


def ddi_matrix_pairs(
    matrix_path: Path, vocabulary_path: Path | None, medications: list[str]
) -> tuple[list[tuple[str, str]], dict]:
    """Adverse ATC3 pairs among ``medications`` from a processed ``ddi_A_final.pkl`` + its ``voc_final.pkl``."""
    if vocabulary_path is None:
        raise CohortError(
            f"{matrix_path}: a DDI matrix needs the voc_final.pkl of the same release to name its rows; "
            "put it beside ddi_A_final.pkl (medrec-prepare: --ddi_vocabulary)"
        )
    matrix = read_third_party_pickle(matrix_path)
    if not isinstance(matrix, np.ndarray) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = getattr(matrix, "shape", type(matrix).__name__)
        raise CohortError(f"{matrix_path}: expected a square numpy DDI adjacency, got {shape}")
    codes = read_medication_vocabulary(vocabulary_path)
    if len(codes) != matrix.shape[0]:
        raise CohortError(
            f"{matrix_path}: {matrix.shape[0]} rows, but the medication vocabulary of {vocabulary_path} "
            f"has {len(codes)} codes: they are not from the same release"
        )
    wanted = set(medications)
    pairs = set()
    for i, j in zip(*np.nonzero(matrix)):
        a, b = codes[i], codes[j]
        if a != b and a in wanted and b in wanted and ATC3_PATTERN.match(a) and ATC3_PATTERN.match(b):
            pairs.add((min(a, b), max(a, b)))
    linked = matrix != 0
    release_pairs = int(np.count_nonzero(np.triu(linked | linked.T, 1)))
    report = {
        "release_drugs": len(codes),
        "release_pairs": release_pairs,
        "cohort_drugs_in_release": len(wanted & set(codes)),
        "atc3_pairs": len(pairs),
    }
    return sorted(pairs), report
