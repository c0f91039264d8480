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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.atomic import UnwritableFolder, read_folder, replace_folder
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
DIRECTIONS = ("both", "a->b")
GENDERS = ("F", "M")
"""``gender`` values; missing (None/NaN) means unknown."""
PLAUSIBLE = {"age": (0.0, 150.0, "years"), "los": (0.0, 3650.0, "days")}
"""Finite ranges of the numeric visit fields (missing values mean unknown)."""


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
        try:
            self.visits = self.visits.sort_values(["patient_id", "visit_order"], kind="stable").reset_index(drop=True)
        except (TypeError, KeyError):  # mixed or missing columns: validate() names the problem
            pass

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
        """Check every file's schema (module docstring); raise CohortError naming the file, the
        column, an example row and the rule of the first violation found."""
        missing = [c for c in REQUIRED_COLUMNS if c not in self.visits.columns]
        if missing:
            raise CohortError(f"{where}: visits lack required column(s) {missing}")
        unknown = [c for c in self.visits.columns if c not in VISIT_COLUMNS]
        if unknown:
            raise CohortError(f"{where}: visits have unknown column(s) {unknown}; allowed: {list(VISIT_COLUMNS)}")
        if self.visits.empty:
            raise CohortError(f"{where}: no visits")
        _check_vocabularies(self.vocab, self.medication_names, where)
        visits = self.visits
        for col in ("patient_id", "visit_id", "visit_order"):
            _fail_where(visits, visits[col].isna(), where, col, "must not be empty (null)")
        if visits["visit_id"].duplicated().any():
            dup = visits.loc[visits["visit_id"].duplicated(), "visit_id"].iloc[0]
            raise CohortError(f"{where}: visit_id {dup!r} occurs more than once")
        order = visits["visit_order"]
        if not pd.api.types.is_integer_dtype(order):
            if pd.api.types.is_float_dtype(order):
                bad = order != order.round()
            else:  # text sorts '10' before '2'
                bad = ~order.map(lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool))
            _fail_where(visits, bad, where, "visit_order", "must be an integer (not text or a fraction)")
        _fail_where(
            visits,
            visits.duplicated(["patient_id", "visit_order"]),
            where,
            "visit_order",
            "must be unique within a patient (two visits of the patient have this order)",
        )
        for name, col in CODE_COLUMNS.items():
            if col in visits.columns:
                _check_code_column(visits, col, name, self.vocab_size(name), where)
        for col, (low, high, unit) in PLAUSIBLE.items():
            if col not in visits.columns:
                continue
            values = visits[col]
            if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
                number = values.map(lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
                _fail_where(visits, values.notna() & ~number, where, col, f"must be a number of {unit}, not text")
            values = values.astype(float)
            rule = f"must be finite and within [{low:g}, {high:g}] {unit} (missing = unknown)"
            if col == "los":
                _fail_where(visits, values < 0, where, col, f"negative length of stay; {rule}")
            _fail_where(visits, values.notna() & ~values.between(low, high), where, col, rule)
        if "gender" in visits.columns:
            gender = visits["gender"]
            _fail_where(visits, gender.notna() & ~gender.isin(GENDERS), where, "gender", f"must be one of {GENDERS}")
        self._check_knowledge(where)
        return self

    def _check_knowledge(self, where: str) -> None:
        """DDI pairs, relations and molecules refer to medication codes of the vocabulary."""
        meds = set(self.vocab["medication"])
        for i, pair in enumerate(self.ddi_pairs):
            outside = [code for code in pair if code not in meds]
            if len(pair) != 2 or outside:
                raise CohortError(
                    f"{where}: ddi.csv row {i} {tuple(pair)!r}: code {outside[0] if outside else pair!r} is not in "
                    f"the medication vocabulary ({len(meds)} codes); DDI pairs must name medication codes"
                )
        relations = self.relations
        for col, allowed in (("relation", RELATIONS), ("direction", DIRECTIONS)):
            bad = ~relations[col].isin(allowed)
            if bad.any():
                row = relations[bad].iloc[0]
                label = "unknown drug relation(s)" if col == "relation" else "unknown direction(s)"
                raise CohortError(
                    f"{where}: drug_relations.csv column {col!r}, row {relations.index[bad][0]} "
                    f"({row['drug_a']}, {row['drug_b']}): {label} {sorted(set(relations.loc[bad, col]))}; "
                    f"allowed {allowed}"
                )
        for col in ("drug_a", "drug_b"):
            bad = ~relations[col].isin(meds)
            if bad.any():
                raise CohortError(
                    f"{where}: drug_relations.csv column {col!r}, row {relations.index[bad][0]}: code "
                    f"{relations.loc[bad, col].iloc[0]!r} is not in the medication vocabulary"
                )
        if not isinstance(self.smiles, dict):
            raise CohortError(f"{where}: smiles.json must be an object {{medication code: [SMILES, ...]}}")
        for code, molecules in self.smiles.items():
            if not isinstance(molecules, (list, tuple)) or not all(isinstance(m, str) for m in molecules):
                raise CohortError(
                    f"{where}: smiles.json entry {code!r} must be a list of SMILES strings, got {molecules!r:.80}"
                )

    def require(self, *names: str, by: str = "this model") -> None:
        """Raise a clear error if optional visit fields a model needs are absent."""
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise CohortError(
                f"{by} needs visit field(s) {missing}, which the cohort ({self.source}) does not have; "
                f"available optional fields: {sorted(self.fields) or 'none'}"
            )

    # --- disk --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
        """Write atomically (``datamodules.atomic.replace_folder``): a half-written cohort never
        appears under ``folder``.

        An existing ``folder`` is replaced only when it is empty or holds a cohort medrec wrote
        (its files alone) from the same source; ``force=True`` replaces anything.
        ``extra_files`` ({name: text}) are written with the cohort (a source's report, e.g. the
        ETL's ``etl.json``) and count as medrec's files on the next replace.
        """
        folder = Path(folder)
        extra_files = extra_files or {}
        check_replaceable(folder, source=self.source, extra_files=tuple(extra_files), force=force)
        try:
            return replace_folder(folder, lambda staging: self._write_files(staging, extra_files))
        except UnwritableFolder as err:  # read-only or missing cache folder, a file in the way, a full disk
            raise CohortError(
                f"{folder.parent}: cannot write the cohort {folder.name} there ({err.strerror or err}); "
                "choose a writable folder ($MEDREC_CACHE or --data.init_args.cache_dir for the cache)"
            ) from None

    def _write_files(self, folder: Path, extra_files: dict[str, str]) -> None:
        visits = self.visits.copy()
        for col in CODE_COLUMNS.values():
            if col in visits.columns:
                visits[col] = visits[col].map(lambda v: np.asarray(v, dtype=np.int32))
        visits.to_parquet(folder / "visits.parquet", index=False)
        vocab = dict(self.vocab)
        if self.medication_names is not None:
            vocab["medication_names"] = list(self.medication_names)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        pd.DataFrame(self.ddi_pairs, columns=["drug_a", "drug_b"]).to_csv(folder / "ddi.csv", index=False)
        (folder / "smiles.json").write_text(json.dumps(self.smiles, indent=1))
        self.relations[["drug_a", "drug_b", "relation", "direction"]].to_csv(folder / "drug_relations.csv", index=False)
        meta = {"format_version": FORMAT_VERSION, "source": self.source, **self.summary()}
        (folder / "cohort.json").write_text(json.dumps(meta, indent=1))
        for name, text in extra_files.items():
            (folder / name).write_text(text)

    @classmethod
    def load(cls, folder: str | os.PathLike, wait_s: float = 30.0) -> Cohort:
        """Read and validate a cohort folder; while another process replaces it (its staging folder
        exists), a read that meets missing files waits for the writer, up to ``wait_s``."""
        folder = Path(folder)
        try:
            return read_folder(folder, cls._load_once, wait_s, errors=(CohortError, OSError), vanished=_vanished)
        except OSError as err:
            raise CohortError(f"{folder}: cannot be read ({err})") from None

    @classmethod
    def _load_once(cls, folder: Path) -> Cohort:
        if not (folder / "cohort.json").is_file():
            raise CohortError(f"{folder}: not a cohort folder (no cohort.json)")
        meta = _read_json(folder / "cohort.json", "corrupt JSON")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CohortError(
                f"{folder}: cohort format version {meta.get('format_version')!r}, this medrec reads "
                f"{FORMAT_VERSION}; re-create the cohort"
            )
        for name in ("visits.parquet", "vocab.json", "ddi.csv"):  # every medrec writer writes these
            if not (folder / name).is_file():
                raise CohortError(f"{folder}: cohort file {name} is missing")
        try:
            visits = pd.read_parquet(folder / "visits.parquet")
        except OSError:  # vanished under a concurrent replace: load retries
            raise
        except Exception as err:  # pyarrow raises several types for damaged files
            raise CohortError(f"{folder / 'visits.parquet'}: cannot be read ({err})") from None
        vocab = _read_json(folder / "vocab.json", "corrupt JSON knowledge file")
        smiles = (
            _read_json(folder / "smiles.json", "corrupt JSON knowledge file")
            if (folder / "smiles.json").exists()
            else {}
        )
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


def _vanished(err: BaseException) -> bool:
    """A cohort file (or the folder) is gone: what a read meets in the gap of a replace."""
    return isinstance(err, OSError) or "missing" in str(err) or "not a cohort folder" in str(err)


def _read_json(path: Path, damaged: str) -> dict:
    """A cohort JSON file, which is always an object ({...})."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CohortError(f"{path}: {damaged} ({err})") from None
    if not isinstance(value, dict):
        raise CohortError(f"{path}: must be a JSON object {{...}}, got a JSON {type(value).__name__}")
    return value


def _fail_where(visits: pd.DataFrame, bad: pd.Series, where: str, col: str, rule: str) -> None:
    """Raise naming the column, the first offending row (and its visit) and the rule, if any row is bad."""
    if not bad.any():
        return
    row = int(np.flatnonzero(bad.to_numpy())[0])
    visit = visits["visit_id"].iloc[row] if "visit_id" in visits.columns else None
    raise CohortError(
        f"{where}: visits.parquet column {col!r}, row {row} (visit_id {visit!r}, {int(bad.sum())} row(s) in all): "
        f"{rule}; got {_shown(visits[col].iloc[row])}"
    )


def _shown(value) -> str:
    """A stored value as the user wrote it (numpy scalars as Python ones), at most 80 characters."""
    value = value.item() if isinstance(value, np.generic) else value
    return f"{value!r:.80}"


def _check_code_column(visits: pd.DataFrame, col: str, name: str, size: int, where: str) -> None:
    """Each value a list of integer indices into the ``name`` vocabulary (empty lists allowed)."""
    rule = f"must be a list of integer indices into the {name} vocabulary (size {size})"
    flat = []
    for row, value in enumerate(visits[col]):
        array = None
        if value is not None and not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__"):
            try:
                array = np.asarray(value)
            except Exception:  # ragged or odd objects: refused below
                array = None
        ok = array is not None and array.ndim == 1
        if ok and array.size:
            if array.dtype.kind == "f":
                ok = bool(np.all(np.isfinite(array)) and np.all(array == np.round(array)))
            else:
                ok = array.dtype.kind in "iu"
        if not ok:
            _fail_where(visits, pd.Series(np.arange(len(visits)) == row), where, col, rule)
        flat.append(array.astype(np.int64) if array.size else np.zeros(0, np.int64))
    codes = np.concatenate(flat) if flat else np.zeros(0, np.int64)
    bad = (codes < 0) | (codes >= size)
    if bad.any():
        lengths = np.array([len(f) for f in flat])
        row = int(np.searchsorted(np.cumsum(lengths), int(np.flatnonzero(bad)[0]), side="right"))
        raise CohortError(
            f"{where}: visits.parquet column {col!r}, row {row} (visit_id {visits['visit_id'].iloc[row]!r}): "
            f"holds index {int(codes[bad][0])} outside the {name} vocabulary of size {size}"
        )


def _check_vocabularies(vocab: dict, names: list | None, where: str) -> None:
    """vocab.json: lists of unique code strings; medication_names as long as the medications."""
    if not isinstance(vocab, dict):
        raise CohortError(f"{where}: vocab.json must be an object {{vocabulary: [codes]}}")
    for name, codes in vocab.items():
        if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
            example = codes if not isinstance(codes, list) else next(c for c in codes if not isinstance(c, str))
            raise CohortError(
                f"{where}: vocab.json vocabulary {name!r} must be a list of code strings; got {example!r:.80}"
            )
        if len(set(codes)) != len(codes):
            seen: set[str] = set()
            dup = next(c for c in codes if c in seen or seen.add(c))
            raise CohortError(
                f"{where}: vocab.json vocabulary {name!r} lists code {dup!r} more than once; codes must be unique"
            )
    if names is not None:
        meds = vocab.get("medication", [])
        if not isinstance(names, list) or len(names) != len(meds):
            length = len(names) if isinstance(names, list) else type(names).__name__
            raise CohortError(
                f"{where}: vocab.json medication_names has {length} entries, the medication vocabulary "
                f"{len(meds)}; one name per medication code"
            )
        bad = next((n for n in names if not isinstance(n, str) and n is not None), None)
        if bad is not None:
            raise CohortError(f"{where}: vocab.json medication_names must be strings; got {bad!r:.80}")


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=columns)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except OSError:  # vanished under a concurrent replace: load retries
        raise
    except Exception as err:
        raise CohortError(f"{path}: cannot be read ({err})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing}")
    return frame[columns]


COHORT_FILES = ("cohort.json", "visits.parquet", "vocab.json", "ddi.csv", "smiles.json", "drug_relations.csv")
"""What ``Cohort.save`` writes; a folder holding anything else was not (only) written by medrec."""


def check_replaceable(
    target: str | os.PathLike, source: str | None = None, extra_files: tuple[str, ...] = (), force: bool = False
) -> None:
    """Refuse to replace ``target`` unless it is missing, empty, or a cohort medrec wrote from
    ``source`` holding only medrec's files (``COHORT_FILES`` + ``extra_files``); ``force`` allows
    anything but a file."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise CohortError(f"{target} exists and is not a folder; refusing to replace it")
    entries = sorted(p.name for p in target.iterdir())
    if not entries or force:
        return
    hint = "move it away or pass --force (force=True) to replace it"
    if "cohort.json" not in entries:
        raise CohortError(f"{target} exists and is not a cohort folder; refusing to replace it ({hint})")
    foreign = [name for name in entries if name not in COHORT_FILES + tuple(extra_files)]
    if foreign:
        raise CohortError(
            f"{target} holds file(s) medrec did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refusing to replace it ({hint})"
        )
    if source is not None:
        try:
            written = json.loads((target / "cohort.json").read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            written = None
        if written != source:
            raise CohortError(
                f"{target} holds a cohort of another source ({written!r}, this one is {source!r}); "
                f"refusing to replace it ({hint})"
            )


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
