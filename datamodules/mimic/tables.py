"""Raw MIMIC tables: where each one lives, which columns the ETL reads, and how to scan it.

MIMIC-III v1.4 keeps every table in one folder (``ADMISSIONS.csv.gz``; upper-case columns in
the full release, lower-case in the open demo). MIMIC-IV v2/v3 splits them into ``hosp/`` and
``icu/`` with lower-case names. File names and column names are matched case-insensitively,
``.csv`` and ``.csv.gz`` both work, and every column is read as text then cast in DuckDB, so a
table is never loaded whole into Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb

from datamodules.cohort import CohortError

Layout = Literal["mimic3", "mimic4"]
LAYOUTS: tuple[str, ...] = ("mimic3", "mimic4")
SUFFIXES = (".csv.gz", ".csv")


@dataclass(frozen=True)
class TableSpec:
    """One raw table of one layout: its file stem(s) and the columns the ETL reads.

    ``columns`` maps the ETL's canonical name to the spellings accepted in the file header
    (first present wins); ``optional`` canonical columns may be absent.
    """

    name: str
    stems: tuple[str, ...]
    columns: dict[str, tuple[str, ...]]
    optional: tuple[str, ...] = ()
    required: bool = True


def _spec(name, stems, columns, optional=(), required=True) -> TableSpec:
    return TableSpec(name, tuple(stems), {k: tuple(v) for k, v in columns.items()}, tuple(optional), required)


_IDS = {"subject_id": ("subject_id",), "hadm_id": ("hadm_id",)}

TABLES: dict[str, dict[str, TableSpec]] = {
    "mimic3": {
        "admissions": _spec(
            "admissions",
            ["ADMISSIONS"],
            {**_IDS, "admittime": ["admittime"], "dischtime": ["dischtime"], "ethnicity": ["ethnicity", "race"]},
            optional=["ethnicity"],
        ),
        "patients": _spec(
            "patients", ["PATIENTS"], {"subject_id": ["subject_id"], "gender": ["gender"], "dob": ["dob"]}
        ),
        "icustays": _spec(
            "icustays", ["ICUSTAYS"], {**_IDS, "intime": ["intime"], "outtime": ["outtime"]}, required=False
        ),
        "diagnoses": _spec("diagnoses", ["DIAGNOSES_ICD"], {**_IDS, "code": ["icd9_code", "icd_code"]}),
        "procedures": _spec("procedures", ["PROCEDURES_ICD"], {**_IDS, "code": ["icd9_code", "icd_code"]}),
        "prescriptions": _spec(
            "prescriptions",
            ["PRESCRIPTIONS"],
            {**_IDS, "start": ["startdate", "starttime"], "drug": ["drug"], "ndc": ["ndc"]},
        ),
        "labevents": _spec(
            "labevents",
            ["LABEVENTS"],
            {"hadm_id": ["hadm_id"], "itemid": ["itemid"], "flag": ["flag"], "valuenum": ["valuenum"]},
            optional=["valuenum"],
            required=False,
        ),
    },
    "mimic4": {
        "admissions": _spec(
            "admissions",
            ["hosp/admissions", "admissions"],
            {**_IDS, "admittime": ["admittime"], "dischtime": ["dischtime"], "ethnicity": ["race", "ethnicity"]},
            optional=["ethnicity"],
        ),
        "patients": _spec(
            "patients",
            ["hosp/patients", "patients"],
            {
                "subject_id": ["subject_id"],
                "gender": ["gender"],
                "anchor_age": ["anchor_age"],
                "anchor_year": ["anchor_year"],
            },
        ),
        "icustays": _spec(
            "icustays",
            ["icu/icustays", "icustays"],
            {**_IDS, "intime": ["intime"], "outtime": ["outtime"]},
            required=False,
        ),
        "diagnoses": _spec(
            "diagnoses",
            ["hosp/diagnoses_icd", "diagnoses_icd"],
            {**_IDS, "code": ["icd_code"], "version": ["icd_version"]},
        ),
        "procedures": _spec(
            "procedures",
            ["hosp/procedures_icd", "procedures_icd"],
            {**_IDS, "code": ["icd_code"], "version": ["icd_version"]},
        ),
        "prescriptions": _spec(
            "prescriptions",
            ["hosp/prescriptions", "prescriptions"],
            {**_IDS, "start": ["starttime", "startdate"], "drug": ["drug"], "ndc": ["ndc"]},
        ),
        "labevents": _spec(
            "labevents",
            ["hosp/labevents", "labevents"],
            {
                "hadm_id": ["hadm_id"],
                "itemid": ["itemid"],
                "flag": ["flag"],
                "valuenum": ["valuenum"],
                "ref_range_lower": ["ref_range_lower"],
                "ref_range_upper": ["ref_range_upper"],
            },
            optional=["valuenum", "ref_range_lower", "ref_range_upper"],
            required=False,
        ),
    },
}


def _find_case_insensitive(folder: Path, relative: str) -> Path | None:
    """``folder/relative`` with every path part matched case-insensitively."""
    current = folder
    for part in Path(relative).parts:
        if not current.is_dir():
            return None
        exact = current / part
        if exact.exists():
            current = exact
            continue
        lowered = part.lower()
        match = next((p for p in sorted(current.iterdir()) if p.name.lower() == lowered), None)
        if match is None:
            return None
        current = match
    return current


def find_table_file(root: Path, spec: TableSpec) -> Path | None:
    for stem in spec.stems:
        for suffix in SUFFIXES:
            found = _find_case_insensitive(root, stem + suffix)
            if found is not None and found.is_file():
                return found
    return None


def detect_layout(root: str | os.PathLike) -> Layout | None:
    """``mimic4`` for a ``hosp/`` folder or a PATIENTS table with ``anchor_age``; ``mimic3`` for ADMISSIONS."""
    root = Path(root)
    if _find_case_insensitive(root, "hosp") is not None and find_table_file(root, TABLES["mimic4"]["admissions"]):
        return "mimic4"
    if find_table_file(root, TABLES["mimic3"]["admissions"]) is None:
        return None
    patients = find_table_file(root, TABLES["mimic3"]["patients"])
    if patients is not None:
        try:
            header = read_header(duckdb.connect(), patients)
        except CohortError:
            header = []
        if "anchor_age" in (h.lower() for h in header):
            return "mimic4"
    return "mimic3"


def sql_string(value: str | os.PathLike) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def csv_scan(path: Path) -> str:
    """A DuckDB table expression that streams the file with every column as text."""
    return (
        f"read_csv({sql_string(path)}, header=true, all_varchar=true, delim=',', quote='\"', "
        "escape='\"', sample_size=20480)"
    )


def read_header(con: duckdb.DuckDBPyConnection, path: Path) -> list[str]:
    """Header names of a CSV file as spelled there (reads only the sniffing sample)."""
    if path.stat().st_size == 0:
        raise CohortError(f"{path}: file is empty (no header)")
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {csv_scan(path)}").fetchall()
    except duckdb.Error as err:
        raise CohortError(f"{path}: cannot be read as CSV ({_first_line(err)})") from None
    return [str(r[0]) for r in rows]


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@dataclass
class RawTable:
    """A located table: its file, and the header spelling of each canonical column it has."""

    spec: TableSpec
    path: Path
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path)

    def has(self, canonical: str) -> bool:
        return canonical in self.columns

    def col(self, canonical: str) -> str:
        """The column as a quoted SQL identifier (NULL if an optional column is absent)."""
        if canonical not in self.columns:
            return "NULL::VARCHAR"
        return sql_ident(self.columns[canonical])

    def scan(self) -> str:
        return csv_scan(self.path)

    def stamp(self) -> dict:
        stat = self.path.stat()
        return {"path": str(self.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def open_tables(
    con: duckdb.DuckDBPyConnection, root: Path, layout: Layout, skip: tuple[str, ...] = ()
) -> dict[str, RawTable]:
    """Locate the tables of ``layout`` under ``root`` (but ``skip``) and check their headers;
    optional tables may be absent."""
    tables: dict[str, RawTable] = {}
    for name, spec in TABLES[layout].items():
        if name in skip:
            continue
        path = find_table_file(root, spec)
        if path is None:
            if spec.required:
                names = " or ".join(f"{s}.csv(.gz)" for s in spec.stems)
                raise CohortError(f"{root}: raw {layout.upper()} table {names} is missing")
            continue
        header = read_header(con, path)
        original = {h.lower(): h for h in header}
        present: dict[str, str] = {}
        missing = []
        for canonical, spellings in spec.columns.items():
            hit = next((s for s in spellings if s in original), None)
            if hit is not None:
                present[canonical] = original[hit]
            elif canonical not in spec.optional:
                missing.append("|".join(spellings))
        if missing:
            raise CohortError(f"{path}: missing column(s) {missing} (the file has {header})")
        tables[name] = RawTable(spec, path, present)
    return tables
