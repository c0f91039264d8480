"""The cohort: medrec's one on-disk format between every data source and every DataModule.

A cohort is a folder::

    cohort.json          format version, source, counts, which optional fields exist
    visits.parquet       one row per visit (see VISIT_COLUMNS); code columns hold
                         integer indices into vocab.json
    vocab.json           {"diagnosis": [...], "procedure": [...], "medication": [...],
                          "lab": [...], "medication_names": [...]}  (index = position)
    ddi.csv              adverse drug-drug interaction pairs: drug_a, drug_b (medication codes)
    smiles.json          {medication code: [SMILES, ...]}
    drug_relations.csv   drug_a, drug_b, relation (synergy|antagonism|unknown), direction
                         (both|a->b) — pairs not listed have relation "none"

Parquet keeps 15k visits loadable in well under a second and stays inspectable with
pandas; JSON/CSV keep the small knowledge files readable by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.errors import MedRecError

FORMAT_VERSION = 1

CODE_FIELDS = ("diagnosis", "procedure", "medication", "lab")
"""Vocabularies; the visit column of each is its plural (``diagnoses``, ...)."""

CODE_COLUMNS = {"diagnosis": "diagnoses", "procedure": "procedures", "medication": "medications", "lab": "labs"}

REQUIRED_COLUMNS = ("patient_id", "visit_id", "visit_order", "diagnoses", "procedures", "medications")
OPTIONAL_COLUMNS = ("time", "labs", "age", "gender", "ethnicity", "los", "notes")
"""``notes``: list of word tokens (strings) per visit, e.g. from the admission note (DPR's T)."""
VISIT_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

RELATIONS = ("none", "synergy", "antagonism", "unknown")
"""Drug-relation labels; DPR's codes are none=0, synergy=1, antagonism=2, unknown=-1."""
RELATION_CODES = {"none": 0, "synergy": 1, "antagonism": 2, "unknown": -1}


class CohortError(MedRecError):
    """A cohort folder (or another data input) is missing, incomplete or inconsistent."""


@dataclass
class Cohort:
    """Visits plus the knowledge that goes with them (vocabularies, DDI, molecules, relations)."""

    visits: pd.DataFrame
    vocab: dict[str, list[str]]
    ddi_pairs: list[tuple[str, str]] = field(default_factory=list)
    smiles: dict[str, list[str]] = field(default_factory=dict)
    relations: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["drug_a", "drug_b", "relation", "direction"])
    )
    medication_names: list[str] | None = None
    source: str = "unknown"

    def __post_init__(self) -> None:
        for name in CODE_FIELDS:
            self.vocab.setdefault(name, [])
        self.visits = self.visits.sort_values(["patient_id", "visit_order"], kind="stable").reset_index(drop=True)

    # --- descriptive -------------------------------------------------------------------
    @property
    def fields(self) -> set[str]:
        """Optional visit fields with at least one non-missing value."""
        present = set()
        for col in OPTIONAL_COLUMNS:
            if col in self.visits.columns and self.visits[col].notna().any():
                if col in ("labs", "notes") and not self.visits[col].dropna().map(len).any():
                    continue
                present.add(col)
        return present

    @property
    def num_patients(self) -> int:
        return int(self.visits["patient_id"].nunique())

    def vocab_size(self, name: str) -> int:
        return len(self.vocab[name])

    def ddi_adjacency(self) -> np.ndarray:
        """Symmetric 0/1 (M, M) matrix over the medication vocabulary."""
        index = {code: i for i, code in enumerate(self.vocab["medication"])}
        adj = np.zeros((len(index), len(index)), dtype=np.float32)
        for a, b in self.ddi_pairs:
            if a in index and b in index and a != b:
                adj[index[a], index[b]] = adj[index[b], index[a]] = 1.0
        return adj

    def relation_matrix(self) -> np.ndarray:
        """Directed (M, M) int matrix R[v, u] with DPR's codes (0 none, 1 syn, 2 ant, -1 unknown)."""
        index = {code: i for i, code in enumerate(self.vocab["medication"])}
        rel = np.zeros((len(index), len(index)), dtype=np.int64)
        for row in self.relations.itertuples(index=False):
            if row.drug_a not in index or row.drug_b not in index:
                continue
            a, b = index[row.drug_a], index[row.drug_b]
            rel[a, b] = RELATION_CODES[row.relation]
            if row.direction == "both":
                rel[b, a] = RELATION_CODES[row.relation]
        return rel

    def summary(self) -> dict:
        return {
            "patients": self.num_patients,
            "visits": len(self.visits),
            **{f"{name}_vocab": self.vocab_size(name) for name in CODE_FIELDS},
            "ddi_pairs": len({tuple(sorted(p)) for p in self.ddi_pairs}),
            "drugs_with_smiles": sum(1 for c in self.vocab["medication"] if self.smiles.get(c)),
            "relations": len(self.relations),
            "fields": sorted(self.fields),
        }

    # --- validation --------------------------------------------------------------------
    def validate(self, where: str = "cohort") -> Cohort:
        """Raise CohortError naming the first inconsistency found."""
        missing = [c for c in REQUIRED_COLUMNS if c not in self.visits.columns]
        if missing:
            raise CohortError(f"{where}: visits lack required column(s) {missing}")
        unknown = [c for c in self.visits.columns if c not in VISIT_COLUMNS]
        if unknown:
            raise CohortError(f"{where}: visits have unknown column(s) {unknown}; allowed: {list(VISIT_COLUMNS)}")
        if self.visits.empty:
            raise CohortError(f"{where}: no visits")
        if self.visits["visit_id"].duplicated().any():
            dup = self.visits.loc[self.visits["visit_id"].duplicated(), "visit_id"].iloc[0]
            raise CohortError(f"{where}: visit_id {dup!r} occurs more than once")
        for name, col in CODE_COLUMNS.items():
            if col not in self.visits.columns:
                continue
            lengths = self.visits[col].map(len).to_numpy()
            if lengths.sum() == 0:
                continue
            flat = np.concatenate([np.asarray(v, dtype=np.int64) for v in self.visits[col]])
            size = self.vocab_size(name)
            bad = (flat < 0) | (flat >= size)
            if bad.any():
                raise CohortError(
                    f"{where}: column {col!r} holds index {int(flat[bad][0])} outside the "
                    f"{name} vocabulary of size {size}"
                )
        bad_rel = set(self.relations["relation"]) - set(RELATIONS)
        if bad_rel:
            raise CohortError(f"{where}: unknown drug relation(s) {sorted(bad_rel)}; allowed {RELATIONS}")
        if "los" in self.visits.columns and (self.visits["los"].dropna() < 0).any():
            raise CohortError(f"{where}: negative length of stay")
        return self

    def require(self, *names: str, by: str = "this model") -> None:
        """Raise a clear error if optional visit fields a model needs are absent."""
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise CohortError(
                f"{by} needs visit field(s) {missing}, which the cohort ({self.source}) does not have; "
                f"available optional fields: {sorted(self.fields) or 'none'}"
            )

    # --- disk --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write atomically: a half-written cohort never appears under ``folder``."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            visits = self.visits.copy()
            for col in CODE_COLUMNS.values():
                if col in visits.columns:
                    visits[col] = visits[col].map(lambda v: np.asarray(v, dtype=np.int32))
            visits.to_parquet(tmp / "visits.parquet", index=False)
            vocab = dict(self.vocab)
            if self.medication_names is not None:
                vocab["medication_names"] = list(self.medication_names)
            (tmp / "vocab.json").write_text(json.dumps(vocab))
            pd.DataFrame(self.ddi_pairs, columns=["drug_a", "drug_b"]).to_csv(tmp / "ddi.csv", index=False)
            (tmp / "smiles.json").write_text(json.dumps(self.smiles, indent=1))
            self.relations[["drug_a", "drug_b", "relation", "direction"]].to_csv(
                tmp / "drug_relations.csv", index=False
            )
            meta = {"format_version": FORMAT_VERSION, "source": self.source, **self.summary()}
            (tmp / "cohort.json").write_text(json.dumps(meta, indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Cohort:
        folder = Path(folder)
        if not (folder / "cohort.json").is_file():
            raise CohortError(f"{folder}: not a cohort folder (no cohort.json)")
        try:
            meta = json.loads((folder / "cohort.json").read_text())
        except json.JSONDecodeError as err:
            raise CohortError(f"{folder / 'cohort.json'}: corrupt JSON ({err})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CohortError(
                f"{folder}: cohort format version {meta.get('format_version')!r}, this medrec reads "
                f"{FORMAT_VERSION}; re-create the cohort"
            )
        for name in ("visits.parquet", "vocab.json"):
            if not (folder / name).is_file():
                raise CohortError(f"{folder}: cohort file {name} is missing")
        try:
            visits = pd.read_parquet(folder / "visits.parquet")
        except Exception as err:  # pyarrow raises several types for damaged files
            raise CohortError(f"{folder / 'visits.parquet'}: cannot be read ({err})") from None
        try:
            vocab = json.loads((folder / "vocab.json").read_text())
            smiles = json.loads((folder / "smiles.json").read_text()) if (folder / "smiles.json").exists() else {}
        except json.JSONDecodeError as err:
            raise CohortError(f"{folder}: corrupt JSON knowledge file ({err})") from None
        names = vocab.pop("medication_names", None)
        ddi = _read_csv(folder / "ddi.csv", ["drug_a", "drug_b"])
        relations = _read_csv(folder / "drug_relations.csv", ["drug_a", "drug_b", "relation", "direction"])
        cohort = cls(
            visits=visits,
            vocab=vocab,
            ddi_pairs=list(zip(ddi["drug_a"], ddi["drug_b"])),
            smiles=smiles,
            relations=relations,
            medication_names=names,
            source=meta.get("source", "cohort"),
        )
        return cohort.validate(where=str(folder))


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=columns)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise CohortError(f"{path}: cannot be read ({err})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing}")
    return frame[columns]


def is_cohort_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "cohort.json").is_file()


def encode_codes(lists: list[list[str]], vocab: list[str] | None = None) -> tuple[list[list[int]], list[str]]:
    """Map code strings to vocabulary indices, growing ``vocab`` in first-seen order."""
    vocab = list(vocab or [])
    index = {c: i for i, c in enumerate(vocab)}
    out = []
    for codes in lists:
        row = []
        for c in codes:
            if c not in index:
                index[c] = len(vocab)
                vocab.append(c)
            row.append(index[c])
        out.append(row)
    return out, vocab
