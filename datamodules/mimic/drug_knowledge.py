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

The BRICS substructure mask SafeDrug needs is derived from these SMILES by the molecule
featurisation, not stored in the cohort.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import duckdb
import pandas as pd

from datamodules.cohort import CohortError
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
