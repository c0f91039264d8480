"""Raw MIMIC-III / MIMIC-IV tables -> a medrec cohort, out of core (DuckDB over the CSV files).

The rules and their defaults follow the SafeDrug/GAMENet reference processing
(``SafeDrug/data/processing.py``), in this order; the ETL report counts admissions and
patients after every step:

1. ``admissions``: every admission of ADMISSIONS with a parseable admit time.
2. ``prescribed``: admissions with at least one prescription row with a usable NDC (missing,
   non-numeric and all-zero NDCs dropped), optionally only drugs started in the first
   ``drug_window_hours`` hours (GAMENet's first-day drugs; default: all).
3. ``min_admissions``: patients with >= ``min_admissions`` (2) such admissions — the reference
   applies this to the prescriptions table, before mapping (``min_admissions_stage``
   ``prescriptions``), which is why its benchmark still has single-visit patients;
   ``final`` applies it to the finished cohort instead. ``min_admissions=1`` keeps all (MiranDa).
4. ``drug_mapped``: admissions with a drug whose NDC maps to ATC3 (NDC -> RXCUI -> ATC4 -> first
   4 characters). Unmapped rows are dropped and counted.
5. ``top_drugs``: the ``top_medications`` (300) most frequent ATC3 classes, counted over the
   de-duplicated (patient, admission, start, drug, ATC3) rows of step 4; with a DrugBank file
   and ``require_smiles`` (the reference's choice) classes without a molecule are dropped.
6. ``with_diagnoses``: the ``top_diagnoses`` (2000) most frequent diagnosis codes, counted
   over all de-duplicated DIAGNOSES_ICD rows.
7. ``with_procedures``: procedure codes (``top_procedures``: all, as in the reference).
8. ``final_min_admissions``: only with ``min_admissions_stage="final"``.

Rows identical in every column the ETL reads are duplicates: removed, and counted per table
in the report (``tables.<name>.duplicate_rows``), as the reference's ``drop_duplicates`` does.

Differences from the reference, on purpose: visits are ordered by admission time (the
reference orders them by HADM_ID, which is random in MIMIC); vocabularies are ordered by
frequency; up to three molecules per ATC3 are the most-prescribed names found in DrugBank.
Patient ids are the zero-padded SUBJECT_ID, so the cohort's patient order (and the
``safedrug`` split) is the reference's numeric SUBJECT_ID order.

Fields the papers' pickles lack: ``los`` in days (discharge - admission; ``los_source="icu"``
sums the admission's ICU stays instead, NaN without one), ``age`` at admission (MIMIC-III
shifts patients over 89 to ~300 years and MIMIC-IV groups them at 91: ages above ``age_cap``
= 90 are set to 90 and counted in the report), ``gender``, ``ethnicity`` (MIMIC-IV ``race``),
``time`` (admit time), and ``labs``: abnormal LABEVENTS results per admission as
``itemid:high|low|abnormal`` — high/low from the reference range where the table has one
(MIMIC-IV), else ``abnormal`` from the flag. MIMIC-IV diagnosis/procedure tokens keep the
ICD version (``9:4019``, ``10:I10``) unless ``icd_version_tokens`` is off or an ICD-9 -> ICD-10
map (CMS GEM) is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pandas as pd

from datamodules.cohort import FORMAT_VERSION, Cohort, CohortError, remove_stale_staging, staging_prefix
from datamodules.cohort import check_replaceable as check_cohort_replaceable
from datamodules.mimic import drug_knowledge, mappings
from datamodules.mimic.tables import (
    LAYOUTS,
    TABLES,
    Layout,
    RawTable,
    detect_layout,
    find_table_file,
    open_tables,
)

log = logging.getLogger(__name__)

ETL_VERSION = 1
"""Bump when the ETL's output for the same inputs and options changes: cached cohorts rebuild."""

ETL_FILE = "etl.json"


@dataclass(frozen=True)
class EtlOptions:
    """How raw MIMIC becomes a cohort; defaults follow the SafeDrug/GAMENet reference processing.

    Args:
        ndc2rxcui: ndc2RXCUI.txt (dict literal NDC -> RXCUI); None = look for it under its public name
            in ``mappings``, $MEDREC_MAPPINGS, the MIMIC folder, then its ``mappings/`` sub-folder.
        rxcui2atc4: RXCUI2atc4.csv (columns RXCUI, ATC4, ...); None = look for it.
        ndc_atc: a plain two-column ndc,atc CSV, used instead of the two files above.
        drug_atc: drug-atc.csv (CID,ATC,... lines) for the DDI matrix; None = look for it.
        ddi: TWOSIDES drug-DDI.csv; without it (and without ``ddi_matrix``) the cohort has no DDI pairs.
        drugbank: drugbank_drugs_info.csv (name, moldb_smiles); without it (and without ``smiles``)
            the cohort has no SMILES.
        smiles: a processed atc3toSMILES.pkl / idx2drug.pkl (dict ATC3 -> SMILES), used without DrugBank.
        ddi_matrix: a processed ddi_A_final.pkl, used without TWOSIDES; needs ``ddi_vocabulary``.
        ddi_vocabulary: the voc_final.pkl of the same release (names the matrix's rows).
        mappings: folder searched first for the mapping files under their public names.
        diagnosis_icd_map: MIMIC-IV only: ICD-9 -> ICD-10 diagnosis map (CMS GEM text or CSV).
        procedure_icd_map: MIMIC-IV only: ICD-9 -> ICD-10 procedure map.
        min_admissions: keep patients with at least this many admissions (2; 1 keeps all).
        min_admissions_stage: count admissions in the prescriptions table before mapping
            (reference) or in the finished cohort.
        drug_window_hours: keep only drugs started before admit time + this many hours
            (24 = GAMENet's first-day drugs); None keeps all (SafeDrug).
        top_medications: keep the N most frequent ATC3 classes (300); None keeps all.
        top_diagnoses: keep the N most frequent diagnosis codes (2000); None keeps all.
        top_procedures: keep the N most frequent procedure codes (None: all, as the reference).
        top_labs: keep the N most frequent abnormal-lab tokens (None: all).
        require_smiles: with a SMILES source (DrugBank or a processed pickle), drop ATC3 classes
            that have no molecule (reference).
        smiles_per_drug: molecules kept per ATC3 class (3).
        ddi_side_effects: TWOSIDES side-effect types kept (40).
        ddi_keep: which end of the by-count ranking of side-effect types is kept: the rarest
            (tail, the reference) or the most frequent (head).
        icd_version_tokens: MIMIC-IV: prefix codes with their ICD version (9:4019, 10:I10).
        labs: read LABEVENTS (when present) into abnormal-lab tokens.
        los_source: length of stay of the admission (discharge - admit) or the sum of its ICU stays.
        age_cap: ages above this are set to it (MIMIC-III's shifted > 89 ages, MIMIC-IV's 91).
        memory_limit: DuckDB memory limit (it spills to disk beyond it); not part of the cache key.
        threads: DuckDB threads (None: all cores); not part of the cache key.
        temp_dir: where DuckDB spills (None: a temporary folder); not part of the cache key.
        options_from: which command's options error messages name (``prepare``: medrec-prepare
            flags; ``train``: ``--data.init_args.*``); not part of the cache key.
    """

    ndc2rxcui: str | None = None
    rxcui2atc4: str | None = None
    ndc_atc: str | None = None
    drug_atc: str | None = None
    ddi: str | None = None
    drugbank: str | None = None
    smiles: str | None = None
    ddi_matrix: str | None = None
    ddi_vocabulary: str | None = None
    mappings: str | None = None
    diagnosis_icd_map: str | None = None
    procedure_icd_map: str | None = None
    min_admissions: int = 2
    min_admissions_stage: Literal["prescriptions", "final"] = "prescriptions"
    drug_window_hours: float | None = None
    top_medications: int | None = 300
    top_diagnoses: int | None = 2000
    top_procedures: int | None = None
    top_labs: int | None = None
    require_smiles: bool = True
    smiles_per_drug: int = 3
    ddi_side_effects: int = 40
    ddi_keep: Literal["tail", "head"] = "tail"
    icd_version_tokens: bool = True
    labs: bool = True
    los_source: Literal["admission", "icu"] = "admission"
    age_cap: float = 90.0
    memory_limit: str = "2GB"
    threads: int | None = None
    temp_dir: str | None = None
    options_from: Literal["prepare", "train"] = "prepare"

    def __post_init__(self) -> None:
        if self.min_admissions < 1:
            raise ValueError(f"min_admissions must be >= 1, got {self.min_admissions}")
        for name in ("top_medications", "top_diagnoses", "top_procedures", "top_labs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.smiles_per_drug < 1 or self.ddi_side_effects < 1:
            raise ValueError("smiles_per_drug and ddi_side_effects must be >= 1")

    @property
    def explicit_mappings(self) -> dict[str, str | None]:
        return {key: getattr(self, key) for key in mappings.MAPPING_FILES}


ENGINE_FIELDS = ("memory_limit", "threads", "temp_dir", "options_from")
# Paths enter the cache key as the resolved files' stamps (path, size, mtime), not as given.
PATH_FIELDS = (*mappings.MAPPING_FILES, "mappings", "diagnosis_icd_map", "procedure_icd_map")


# --- entry points ----------------------------------------------------------------------------
def prepare_cohort(
    root: str | os.PathLike,
    layout: Literal["auto", "mimic3", "mimic4"] = "auto",
    options: EtlOptions | None = None,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Cohort:
    """The cohort of a raw MIMIC folder: reused from ``out`` (or the cache) when inputs and
    options are unchanged, else built and written atomically there."""
    return prepare(root, layout, options, out, cache_dir, force)[0]


def prepare(
    root: str | os.PathLike,
    layout: Literal["auto", "mimic3", "mimic4"] = "auto",
    options: EtlOptions | None = None,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> tuple[Cohort, Path]:
    """``prepare_cohort`` that also says which folder holds the cohort."""
    options = options or EtlOptions()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CohortError(f"MIMIC folder {root} does not exist or is not a folder")
    layout = resolve_layout(root, layout)
    key, inputs = cache_key(root, layout, options)
    if out is not None:
        target = Path(out).expanduser()
    else:
        from datamodules.sources import default_cache_dir

        target = Path(cache_dir) if cache_dir else default_cache_dir()
        target = target / f"{layout}-{root.name}-{key[:12]}"
    if not force and is_current(target, key):
        started = time.perf_counter()
        cohort = Cohort.load(target)
        log.info("loaded cached %s cohort %s in %.1f s", layout, target, time.perf_counter() - started)
        return cohort, target
    check_replaceable(target, source=f"{layout}:{root.name}", force=force)  # before the work
    cohort, report = build_cohort(root, layout, options)
    meta = {
        "etl_version": ETL_VERSION,
        "key": key,
        "layout": layout,
        "root": str(root.resolve()),
        "options": asdict(options),
        "inputs": inputs,
        "report": report,
    }
    write_cohort_atomically(cohort, meta, target, force=force)
    log.info("wrote %s cohort %s (%s)", layout, target, cohort.summary())
    return cohort, target


def resolve_layout(root: Path, layout: str) -> Layout:
    if layout == "auto":
        found = detect_layout(root)
        if found is None:
            raise CohortError(
                f"{root}: no raw MIMIC tables found (expected ADMISSIONS.csv[.gz] or hosp/admissions.csv[.gz])"
            )
        return found
    if layout not in LAYOUTS:
        raise CohortError(f"unknown MIMIC layout {layout!r}; expected one of {LAYOUTS}")
    return layout  # type: ignore[return-value]


def cache_key(root: Path, layout: Layout, options: EtlOptions) -> tuple[str, dict]:
    """A digest of the ETL version, the semantic options and every input file's stamp."""
    inputs: dict[str, dict | None] = {}
    for name, spec in TABLES[layout].items():
        path = find_table_file(root, spec)
        inputs[name] = _stamp(path) if path else None
    found = mappings.find_mapping_files(root, options.explicit_mappings, options.mappings)
    for name, path in found.items():
        inputs[name] = _stamp(path) if path else None
    for name in ("diagnosis_icd_map", "procedure_icd_map"):
        value = getattr(options, name)
        inputs[name] = _stamp(Path(value).expanduser()) if value else None
    semantic = {k: v for k, v in asdict(options).items() if k not in ENGINE_FIELDS + PATH_FIELDS}
    payload = json.dumps(
        {"etl": ETL_VERSION, "format": FORMAT_VERSION, "layout": layout, "options": semantic, "inputs": inputs},
        sort_keys=True,
    )
    return hashlib.sha1(payload.encode()).hexdigest(), inputs


def _stamp(path: Path) -> dict:
    if not path.is_file():
        raise CohortError(f"input file {path} does not exist")
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_current(folder: Path, key: str) -> bool:
    """True when ``folder`` holds a loadable cohort this ETL version wrote for ``key``."""
    try:
        meta = json.loads((folder / ETL_FILE).read_text())
        cohort_meta = json.loads((folder / "cohort.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("key") == key
        and meta.get("etl_version") == ETL_VERSION
        and cohort_meta.get("format_version") == FORMAT_VERSION
    )


def check_replaceable(target: Path, source: str | None = None, force: bool = False) -> None:
    """Only an empty folder or a cohort this ETL wrote (from ``source``) may be replaced; ``force``: any."""
    check_cohort_replaceable(target, source=source, extra_files=(ETL_FILE,), force=force)


def write_cohort_atomically(cohort: Cohort, meta: dict, target: Path, force: bool = False) -> Path:
    """Cohort files and ``etl.json`` appear under ``target`` together or not at all."""
    check_replaceable(target, source=cohort.source, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)  # what killed runs left next to it
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    try:
        built = cohort.save(staging / "cohort")
        (built / ETL_FILE).write_text(json.dumps(meta, indent=1, default=str))
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_etl_report(folder: str | os.PathLike) -> dict:
    """The report stored with a cohort this ETL wrote."""
    path = Path(folder) / ETL_FILE
    if not path.is_file():
        raise CohortError(f"{folder}: no {ETL_FILE} (not written by the MIMIC ETL)")
    return json.loads(path.read_text())["report"]


# --- the pipeline ----------------------------------------------------------------------------
def build_cohort(root: str | os.PathLike, layout: Layout, options: EtlOptions | None = None) -> tuple[Cohort, dict]:
    """Run the ETL; returns the cohort and its report (counts after every step)."""
    options = options or EtlOptions()
    root = Path(root)
    base = Path(tempfile.gettempdir()) / "medrec-duckdb"
    remove_stale_staging(base)  # spill folders that killed runs left behind
    spill = Path(options.temp_dir or tempfile.mkdtemp(prefix=staging_prefix(base), dir=base.parent))
    config = {"memory_limit": options.memory_limit, "preserve_insertion_order": False, "temp_directory": str(spill)}
    if options.threads:
        config["threads"] = options.threads
    con = duckdb.connect(config=config)
    etl = None
    try:
        etl = _Etl(con, root, layout, options)
        return etl.run()
    except duckdb.Error as err:
        where = (etl.reading if etl else None) or root
        raise CohortError(f"{where}: cannot be processed ({str(err).strip().splitlines()[0]})") from None
    finally:
        con.close()
        if not options.temp_dir:
            shutil.rmtree(spill, ignore_errors=True)


BIGINT = "TRY_CAST(trim({}) AS BIGINT)"
TIMESTAMP = "TRY_CAST(trim({}) AS TIMESTAMP)"
DOUBLE = "TRY_CAST(trim({}) AS DOUBLE)"


def _bad(raw: str, parsed: str) -> str:
    """SQL: the raw text where it is non-empty but did not parse, else NULL."""
    return f"CASE WHEN {parsed} IS NULL AND nullif(trim({raw}), '') IS NOT NULL THEN {raw} END"


class _Etl:
    def __init__(self, con: duckdb.DuckDBPyConnection, root: Path, layout: Layout, options: EtlOptions):
        self.con, self.root, self.layout, self.options = con, root, layout, options
        self.report: dict = {"layout": layout, "root": str(root), "tables": {}, "steps": [], "notes": []}
        self.reading: Path | None = None  # the file being scanned, for error messages

    # helpers -----------------------------------------------------------------------------
    def sql(self, query: str, params=None):
        return self.con.execute(query, params) if params is not None else self.con.execute(query)

    def row(self, query: str) -> tuple | None:
        """The first row of a query (None when it has none); always consumes the whole result."""
        rows = self.sql(query).fetchall()
        return rows[0] if rows else None

    def scalar(self, query: str):
        return self.row(query)[0]

    def note(self, message: str) -> None:
        log.info(message)
        self.report["notes"].append(message)

    def step(self, name: str, table: str) -> None:
        adm, pat = self.row(f"SELECT count(*), count(DISTINCT subject_id) FROM {table}")
        self.report["steps"].append({"step": name, "admissions": int(adm), "patients": int(pat)})
        log.info("%-22s %8d admissions %8d patients", name, adm, pat)
        if adm == 0:
            raise CohortError(
                f"{self.root}: no admission is left after step {name!r} "
                f"(counts so far: {[(s['step'], s['admissions']) for s in self.report['steps']]})"
            )

    def check_parsed(self, table: RawTable, temp: str, column: str, what: str) -> None:
        """Raise naming the file and column if a non-empty value failed to parse."""
        bad, example = self.row(
            f"SELECT coalesce(sum(n) FILTER (WHERE bad_{column} IS NOT NULL), 0), any_value(bad_{column}) FROM {temp}"
        )
        if bad:
            raise CohortError(
                f"{table.path}: column {table.columns[column]!r} has {bad} unparseable {what} value(s), "
                f"e.g. {example!r}"
            )

    def require_rows(self, table: RawTable, temp: str) -> int:
        rows = int(self.scalar(f"SELECT coalesce(sum(n), 0) FROM {temp}") or 0)
        if rows == 0:
            raise CohortError(f"{table.path}: table is empty (header only)")
        return rows

    def table_stats(self, name: str, table: RawTable, temp: str, **extra) -> dict:
        rows, distinct = self.row(f"SELECT coalesce(sum(n), 0), count(*) FROM {temp}")
        stats = {"file": str(table.path), "rows": int(rows), "duplicate_rows": int(rows - distinct), **extra}
        self.report["tables"][name] = stats
        if stats["duplicate_rows"]:
            self.note(f"{table.path.name}: {stats['duplicate_rows']} duplicated row(s) removed")
        return stats

    # pipeline ------------------------------------------------------------------------------
    def run(self) -> tuple[Cohort, dict]:
        started = time.perf_counter()
        skip = tuple(
            name
            for name, unused in (("icustays", self.options.los_source != "icu"), ("labevents", not self.options.labs))
            if unused
        )
        self.tables = open_tables(self.con, self.root, self.layout, skip)
        self.mapping_files = mappings.find_mapping_files(
            self.root, self.options.explicit_mappings, self.options.mappings
        )
        self.load_admissions()
        self.load_patients()
        self.load_prescriptions()
        self.load_codes("diagnoses", self.options.top_diagnoses, self.options.diagnosis_icd_map)
        self.load_codes("procedures", self.options.top_procedures, self.options.procedure_icd_map)
        self.select_admissions()
        self.load_labs()
        cohort = self.assemble()
        self.report["cohort"] = cohort.summary()
        self.report["seconds"] = round(time.perf_counter() - started, 2)
        return cohort.validate(where=f"{self.layout} ETL of {self.root}"), self.report

    def load_admissions(self) -> None:
        t = self.tables["admissions"]
        self.reading = t.path
        s, h, a, d = (t.col(c) for c in ("subject_id", "hadm_id", "admittime", "dischtime"))
        self.sql(
            f"""CREATE TEMP TABLE adm_raw AS
            SELECT subject_id, hadm_id, admittime, dischtime, ethnicity,
                   bad_subject_id, bad_hadm_id, bad_admittime, bad_dischtime, count(*) AS n
            FROM (SELECT {BIGINT.format(s)} AS subject_id, {BIGINT.format(h)} AS hadm_id,
                         {TIMESTAMP.format(a)} AS admittime, {TIMESTAMP.format(d)} AS dischtime,
                         nullif(trim({t.col("ethnicity")}), '') AS ethnicity,
                         {_bad(s, BIGINT.format(s))} AS bad_subject_id, {_bad(h, BIGINT.format(h))} AS bad_hadm_id,
                         {_bad(a, TIMESTAMP.format(a))} AS bad_admittime,
                         {_bad(d, TIMESTAMP.format(d))} AS bad_dischtime
                  FROM {t.scan()})
            GROUP BY ALL"""
        )
        self.require_rows(t, "adm_raw")
        self.check_parsed(t, "adm_raw", "subject_id", "integer")
        self.check_parsed(t, "adm_raw", "hadm_id", "integer")
        self.check_parsed(t, "adm_raw", "admittime", "date")
        self.check_parsed(t, "adm_raw", "dischtime", "date")
        missing = self.scalar(
            "SELECT coalesce(sum(n), 0) FROM adm_raw WHERE hadm_id IS NULL OR subject_id IS NULL OR admittime IS NULL"
        )
        self.table_stats("admissions", t, "adm_raw", rows_without_ids_or_admittime=int(missing))
        self.sql(
            "CREATE TEMP TABLE adm AS SELECT subject_id, hadm_id, admittime, dischtime, ethnicity FROM adm_raw "
            "WHERE hadm_id IS NOT NULL AND subject_id IS NOT NULL AND admittime IS NOT NULL"
        )
        clash = self.row("SELECT hadm_id, count(*) FROM adm GROUP BY hadm_id HAVING count(*) > 1 LIMIT 1")
        if clash:
            raise CohortError(
                f"{t.path}: hadm_id {clash[0]} occurs {clash[1]} times with different values; "
                "an admission must be one row"
            )
        self.sql("CREATE TEMP TABLE s0 AS SELECT subject_id, hadm_id FROM adm")
        self.step("admissions", "s0")

    def load_patients(self) -> None:
        t = self.tables["patients"]
        self.reading = t.path
        s, g = t.col("subject_id"), t.col("gender")
        if self.layout == "mimic3":
            dob = t.col("dob")
            parsed = (
                f"{TIMESTAMP.format(dob)} AS dob, NULL::DOUBLE AS anchor_age, NULL::DOUBLE AS anchor_year, "
                f"{_bad(dob, TIMESTAMP.format(dob))} AS bad_dob"
            )
            checks = [("dob", "date")]
        else:
            aa, ay = t.col("anchor_age"), t.col("anchor_year")
            parsed = (
                f"NULL::TIMESTAMP AS dob, {DOUBLE.format(aa)} AS anchor_age, {DOUBLE.format(ay)} AS anchor_year, "
                f"{_bad(aa, DOUBLE.format(aa))} AS bad_anchor_age, {_bad(ay, DOUBLE.format(ay))} AS bad_anchor_year"
            )
            checks = [("anchor_age", "number"), ("anchor_year", "number")]
        self.sql(
            f"""CREATE TEMP TABLE pat_raw AS
            SELECT *, count(*) AS n FROM (
                SELECT {BIGINT.format(s)} AS subject_id, upper(nullif(trim({g}), '')) AS gender, {parsed},
                       {_bad(s, BIGINT.format(s))} AS bad_subject_id
                FROM {t.scan()})
            GROUP BY ALL"""
        )
        self.require_rows(t, "pat_raw")
        self.check_parsed(t, "pat_raw", "subject_id", "integer")
        for column, what in checks:
            self.check_parsed(t, "pat_raw", column, what)
        self.table_stats("patients", t, "pat_raw")
        self.sql(
            "CREATE TEMP TABLE pat AS SELECT subject_id, any_value(gender) AS gender, any_value(dob) AS dob, "
            "any_value(anchor_age) AS anchor_age, any_value(anchor_year) AS anchor_year, count(*) AS versions "
            "FROM pat_raw WHERE subject_id IS NOT NULL GROUP BY subject_id"
        )
        clash = self.row("SELECT subject_id FROM pat WHERE versions > 1 LIMIT 1")
        if clash:
            raise CohortError(f"{t.path}: subject_id {clash[0]} occurs more than once with different values")

    def load_prescriptions(self) -> None:
        t = self.tables["prescriptions"]
        self.reading = t.path
        s, h, st, nd = (t.col(c) for c in ("subject_id", "hadm_id", "start", "ndc"))
        ndc_text = f"regexp_replace(trim({nd}), '\\.0$', '')"
        ndc = (
            f"CASE WHEN regexp_full_match({ndc_text}, '[0-9]{{1,11}}') AND lpad({ndc_text}, 11, '0') <> "
            f"'00000000000' THEN lpad({ndc_text}, 11, '0') END"
        )
        self.sql(
            f"""CREATE TEMP TABLE rx AS
            SELECT subject_id, hadm_id, start, drug, ndc, bad_start, count(*) AS n FROM (
                SELECT {BIGINT.format(s)} AS subject_id, {BIGINT.format(h)} AS hadm_id,
                       {TIMESTAMP.format(st)} AS start, nullif(trim({t.col("drug")}), '') AS drug, {ndc} AS ndc,
                       {_bad(st, TIMESTAMP.format(st))} AS bad_start
                FROM {t.scan()})
            GROUP BY ALL"""
        )
        rows = self.require_rows(t, "rx")
        self.check_parsed(t, "rx", "start", "date")
        no_ndc = int(self.scalar("SELECT coalesce(sum(n), 0) FROM rx WHERE ndc IS NULL"))
        no_ids = int(self.scalar("SELECT coalesce(sum(n), 0) FROM rx WHERE hadm_id IS NULL OR subject_id IS NULL"))
        self.table_stats("prescriptions", t, "rx", rows_without_usable_ndc=no_ndc, rows_without_ids=no_ids)
        if no_ndc == rows:
            raise CohortError(f"{t.path}: no row has a usable NDC (all missing, zero or non-numeric)")

        window = ""
        hours = self.options.drug_window_hours
        if hours is not None:
            window = f"AND r.start IS NOT NULL AND r.start < a.admittime + to_microseconds({int(hours * 3.6e9)})"
        self.sql(
            f"""CREATE TEMP TABLE rxv AS
            SELECT r.subject_id, r.hadm_id, r.start, r.drug, r.ndc, r.n
            FROM rx r JOIN adm a USING (subject_id, hadm_id) WHERE r.ndc IS NOT NULL {window}"""
        )
        self.sql("DROP TABLE rx")
        self.sql("CREATE TEMP TABLE s1 AS SELECT DISTINCT subject_id, hadm_id FROM rxv")
        self.step("prescribed" if hours is None else f"prescribed_first_{hours:g}h", "s1")
        if self.options.min_admissions_stage == "prescriptions":
            self.sql(self._min_admissions("s2", "s1"))
            self.step("min_admissions", "s2")
        else:
            self.sql("CREATE TEMP TABLE s2 AS SELECT * FROM s1")

        ndc_map, source = mappings.ndc_to_atc3(
            self.mapping_files, self.options.explicit_mappings, self.options.options_from
        )
        self.con.register("ndc_map_df", ndc_map)
        self.sql("CREATE TEMP TABLE ndc_map AS SELECT * FROM ndc_map_df")
        self.con.unregister("ndc_map_df")
        total, mapped, ndcs, mapped_ndcs = self.row(
            """SELECT coalesce(sum(n), 0), coalesce(sum(n) FILTER (WHERE m.atc3 IS NOT NULL), 0),
                      count(DISTINCT r.ndc), count(DISTINCT r.ndc) FILTER (WHERE m.atc3 IS NOT NULL)
               FROM rxv r JOIN s2 USING (subject_id, hadm_id) LEFT JOIN ndc_map m USING (ndc)"""
        )
        top_unmapped = self.sql(
            """SELECT r.ndc, sum(n) AS rows FROM rxv r JOIN s2 USING (subject_id, hadm_id)
               WHERE r.ndc NOT IN (SELECT ndc FROM ndc_map) GROUP BY r.ndc ORDER BY rows DESC, r.ndc LIMIT 10"""
        ).fetchall()
        self.report["drug_mapping"] = {
            **source,
            "rows": int(total),
            "mapped_rows": int(mapped),
            "unmapped_rows": int(total - mapped),
            "unmapped_fraction": round(float((total - mapped) / total), 4) if total else 0.0,
            "distinct_ndcs": int(ndcs),
            "unmapped_ndcs": int(ndcs - mapped_ndcs),
            "top_unmapped_ndcs": [[n, int(c)] for n, c in top_unmapped],
        }
        if mapped == 0:
            examples = [n for n, _ in top_unmapped[:3]]
            raise CohortError(
                f"{source['source']}: the drug mapping maps none of the {ndcs} distinct NDCs in {t.path.name} "
                f"(e.g. {examples}); check the mapping files belong to this data"
            )
        self.note(
            f"drug mapping: {total - mapped} of {total} prescription rows "
            f"({100 * (total - mapped) / total:.1f} %) have an NDC without ATC code and are dropped"
        )
        # The reference counts drug frequency over rows de-duplicated on (patient, admission, start, drug, ATC3).
        self.sql(
            """CREATE TEMP TABLE rxm AS
            SELECT r.subject_id, r.hadm_id, r.start, r.drug, m.atc3
            FROM rxv r JOIN s2 USING (subject_id, hadm_id) JOIN ndc_map m USING (ndc) GROUP BY ALL"""
        )
        self.sql("DROP TABLE rxv")
        self.sql("CREATE TEMP TABLE s3 AS SELECT DISTINCT subject_id, hadm_id FROM rxm")
        self.step("drug_mapped", "s3")

        limit = f"LIMIT {self.options.top_medications}" if self.options.top_medications else ""
        self.sql(
            f"CREATE TEMP TABLE top_drugs AS SELECT atc3, count(*) AS rows FROM rxm GROUP BY atc3 "
            f"ORDER BY rows DESC, atc3 {limit}"
        )
        names = self.sql(
            """SELECT atc3, lower(drug) AS name, count(*) AS rows, any_value(drug) AS spelling FROM rxm
               WHERE atc3 IN (SELECT atc3 FROM top_drugs) AND drug IS NOT NULL GROUP BY atc3, lower(drug)"""
        ).df()
        self.medication_names = (
            names.sort_values(["atc3", "rows", "name"], ascending=[True, False, True])
            .drop_duplicates("atc3")
            .set_index("atc3")["spelling"]
            .to_dict()
        )
        kept = [a for (a,) in self.sql("SELECT atc3 FROM top_drugs ORDER BY atc3").fetchall()]
        kept = self.load_smiles(names, kept)
        self.sql("CREATE TEMP TABLE kept_drugs (atc3 VARCHAR)")
        self.sql("INSERT INTO kept_drugs SELECT unnest(?::VARCHAR[])", [kept])
        self.sql(
            "CREATE TEMP TABLE med AS SELECT DISTINCT subject_id, hadm_id, atc3 AS token FROM rxm "
            "WHERE atc3 IN (SELECT atc3 FROM kept_drugs)"
        )
        self.sql("DROP TABLE rxm")
        self.sql("CREATE TEMP TABLE s4 AS SELECT DISTINCT subject_id, hadm_id FROM med")
        self.step("top_drugs", "s4")

    def load_smiles(self, names: pd.DataFrame, kept: list[str]) -> list[str]:
        """SMILES per ATC3 class from DrugBank (by drug name) or else a processed ATC3 -> SMILES
        pickle; returns the classes kept (``require_smiles`` drops those without a molecule)."""
        self.smiles: dict[str, list[str]] = {}
        drugbank, processed = self.mapping_files.get("drugbank"), self.mapping_files.get("smiles")
        if drugbank is not None:
            source = drugbank
            self.smiles = drug_knowledge.smiles_per_class(
                names, drug_knowledge.read_drugbank_smiles(drugbank), self.options.smiles_per_drug
            )
        elif processed is not None:
            source = processed
            self.smiles = drug_knowledge.read_smiles_pickle(processed, self.options.smiles_per_drug)
        else:
            hint = mappings.option_hint(("drugbank",), self.options.options_from)
            self.note(
                "no drugbank_drugs_info.csv (or atc3toSMILES.pkl / idx2drug.pkl): the cohort has no SMILES, "
                f"which SafeDrug needs; {hint}"
            )
            return kept
        without = [a for a in kept if a not in self.smiles]
        self.report["smiles"] = {
            "source": str(source),
            "classes_with_smiles": len(kept) - len(without),
            "classes_without_smiles": without,
        }
        if self.options.require_smiles and without:
            self.note(f"{len(without)} ATC3 class(es) without a molecule in {source.name} dropped: {without[:20]}")
            kept = [a for a in kept if a in self.smiles]
        return kept

    def _min_admissions(self, new: str, old: str) -> str:
        return (
            f"CREATE OR REPLACE TEMP TABLE {new} AS SELECT * FROM {old} WHERE subject_id IN "
            f"(SELECT subject_id FROM {old} GROUP BY subject_id HAVING count(*) >= {self.options.min_admissions})"
        )

    def load_codes(self, name: str, top: int | None, icd_map: str | None) -> None:
        t = self.tables[name]
        self.reading = t.path
        s, h, c = t.col("subject_id"), t.col("hadm_id"), t.col("code")
        code = f"nullif(trim({c}), '')"
        join = ""
        if self.layout == "mimic4":
            version = f"trim({t.col('version')})"
            mapped = code
            if icd_map:
                frame = mappings.read_icd_map(Path(icd_map).expanduser())
                self.con.register(f"{name}_icd_map_df", frame)
                self.sql(f"CREATE TEMP TABLE {name}_icd_map AS SELECT * FROM {name}_icd_map_df")
                join = f"LEFT JOIN {name}_icd_map m ON {version} = '9' AND m.source = {code}"
                mapped = f"coalesce(m.target, {code})"
                version = f"CASE WHEN m.target IS NOT NULL THEN '10' ELSE {version} END"
            token = f"{version} || ':' || {mapped}" if self.options.icd_version_tokens else mapped
            code = f"CASE WHEN {code} IS NOT NULL THEN {token} END"
        self.sql(
            f"""CREATE TEMP TABLE {name}_raw AS
            SELECT subject_id, hadm_id, token, bad_subject_id, bad_hadm_id, count(*) AS n FROM (
                SELECT {BIGINT.format(s)} AS subject_id, {BIGINT.format(h)} AS hadm_id, {code} AS token,
                       {_bad(s, BIGINT.format(s))} AS bad_subject_id, {_bad(h, BIGINT.format(h))} AS bad_hadm_id
                FROM {t.scan()} {join})
            GROUP BY ALL"""
        )
        self.require_rows(t, f"{name}_raw")
        for column in ("subject_id", "hadm_id"):  # a malformed id is an error, not a silently dropped row
            self.check_parsed(t, f"{name}_raw", column, "integer id")
        unusable = "token IS NULL OR hadm_id IS NULL OR subject_id IS NULL"
        dropped = int(self.scalar(f"SELECT coalesce(sum(n), 0) FROM {name}_raw WHERE {unusable}"))
        self.table_stats(name, t, f"{name}_raw", rows_without_code_or_ids=dropped)
        self.sql(f"DELETE FROM {name}_raw WHERE {unusable}")
        limit = f"LIMIT {top}" if top else ""
        self.sql(
            f"""CREATE TEMP TABLE {name} AS SELECT subject_id, hadm_id, token FROM {name}_raw
            WHERE token IN (SELECT token FROM {name}_raw GROUP BY token ORDER BY count(*) DESC, token {limit})"""
        )
        self.sql(f"DROP TABLE {name}_raw")

    def select_admissions(self) -> None:
        self.reading = None
        self.sql("CREATE TEMP TABLE s5 AS SELECT * FROM s4 SEMI JOIN diagnoses USING (subject_id, hadm_id)")
        self.step("with_diagnoses", "s5")
        self.sql("CREATE TEMP TABLE s6 AS SELECT * FROM s5 SEMI JOIN procedures USING (subject_id, hadm_id)")
        self.step("with_procedures", "s6")
        if self.options.min_admissions_stage == "final":
            self.sql(self._min_admissions("visits", "s6"))
            self.step("final_min_admissions", "visits")
        else:
            self.sql("CREATE TEMP TABLE visits AS SELECT * FROM s6")

    def load_labs(self) -> None:
        t = self.tables.get("labevents")
        self.sql("CREATE TEMP TABLE labs (subject_id BIGINT, hadm_id BIGINT, token VARCHAR)")
        if not self.options.labs:
            return
        if t is None:
            self.note("no LABEVENTS table: the cohort has no labs")
            return
        self.reading = t.path
        v, lo, hi = (DOUBLE.format(t.col(c)) for c in ("valuenum", "ref_range_lower", "ref_range_upper"))
        direction = (
            f"CASE WHEN {v} IS NOT NULL AND {lo} IS NOT NULL AND {hi} IS NOT NULL AND {hi} > {lo} "
            f"AND {v} > {hi} THEN 'high' "
            f"WHEN {v} IS NOT NULL AND {lo} IS NOT NULL AND {hi} IS NOT NULL AND {hi} > {lo} "
            f"AND {v} < {lo} THEN 'low' "
            f"WHEN lower(trim({t.col('flag')})) = 'abnormal' THEN 'abnormal' END"
        )
        self.sql(
            f"""CREATE TEMP TABLE lab_raw AS
            SELECT hadm_id, itemid || ':' || direction AS token, count(*) AS n FROM (
                SELECT {BIGINT.format(t.col("hadm_id"))} AS hadm_id, {BIGINT.format(t.col("itemid"))} AS itemid,
                       {direction} AS direction
                FROM {t.scan()})
            WHERE hadm_id IN (SELECT hadm_id FROM visits) AND itemid IS NOT NULL AND direction IS NOT NULL
            GROUP BY ALL"""
        )
        rows = int(self.scalar("SELECT coalesce(sum(n), 0) FROM lab_raw"))
        self.report["tables"]["labevents"] = {"file": str(t.path), "abnormal_rows_in_cohort": rows}
        limit = f"LIMIT {self.options.top_labs}" if self.options.top_labs else ""
        self.sql(
            f"""INSERT INTO labs SELECT v.subject_id, l.hadm_id, l.token FROM lab_raw l JOIN visits v USING (hadm_id)
            WHERE l.token IN (SELECT token FROM lab_raw GROUP BY token ORDER BY count(*) DESC, token {limit})"""
        )
        self.sql("DROP TABLE lab_raw")

    def vocabulary(self, table: str) -> list[str]:
        """Codes of ``table`` within the final visits, most frequent (by visits) first; indexes them."""
        self.sql(
            f"""CREATE TEMP TABLE {table}_final AS SELECT DISTINCT x.hadm_id, x.token
            FROM {table} x SEMI JOIN visits USING (subject_id, hadm_id)"""
        )
        self.sql(
            f"""CREATE TEMP TABLE {table}_vocab AS SELECT token, (row_number() OVER (ORDER BY count(*) DESC, token)) - 1
            AS idx FROM {table}_final GROUP BY token"""
        )
        return [tok for (tok,) in self.sql(f"SELECT token FROM {table}_vocab ORDER BY idx").fetchall()]

    def assemble(self) -> Cohort:
        self.reading = None
        opts = self.options
        vocab = {
            "diagnosis": self.vocabulary("diagnoses"),
            "procedure": self.vocabulary("procedures"),
            "medication": self.vocabulary("med"),
            "lab": self.vocabulary("labs"),
        }
        lists = {
            "diagnoses": "diagnoses",
            "procedures": "procedures",
            "medications": "med",
            "labs": "labs",
        }
        joins, selects = [], []
        for column, table in lists.items():
            self.sql(
                f"""CREATE TEMP TABLE {table}_lists AS SELECT f.hadm_id, list(v.idx ORDER BY v.idx) AS codes
                FROM {table}_final f JOIN {table}_vocab v USING (token) GROUP BY f.hadm_id"""
            )
            joins.append(f"LEFT JOIN {table}_lists {table}_l ON {table}_l.hadm_id = a.hadm_id")
            selects.append(f"coalesce({table}_l.codes, []::BIGINT[]) AS {column}")

        if opts.los_source == "icu":
            icu = self.tables.get("icustays")
            if icu is None:
                raise CohortError(f"{self.root}: los_source='icu' needs the ICUSTAYS table, which is missing")
            self.reading = icu.path
            self.sql(
                f"""CREATE TEMP TABLE icu AS SELECT hadm_id, sum(epoch(outtime) - epoch(intime)) / 86400.0 AS days
                FROM (SELECT {BIGINT.format(icu.col("hadm_id"))} AS hadm_id,
                             {TIMESTAMP.format(icu.col("intime"))} AS intime,
                             {TIMESTAMP.format(icu.col("outtime"))} AS outtime FROM {icu.scan()})
                WHERE hadm_id IS NOT NULL GROUP BY hadm_id"""
            )
            los = "icu.days"
            joins.append("LEFT JOIN icu ON icu.hadm_id = a.hadm_id")
        else:
            los = "(epoch(a.dischtime) - epoch(a.admittime)) / 86400.0"
        if self.layout == "mimic3":
            age = "(epoch(a.admittime) - epoch(p.dob)) / (365.25 * 86400.0)"
        else:
            age = "p.anchor_age + (year(a.admittime) - p.anchor_year)"
        width = int(self.scalar("SELECT max(length(subject_id::VARCHAR)) FROM visits"))
        frame = self.sql(
            f"""SELECT lpad(a.subject_id::VARCHAR, {width}, '0') AS patient_id, a.hadm_id::VARCHAR AS visit_id,
                (row_number() OVER (PARTITION BY a.subject_id ORDER BY a.admittime, a.hadm_id)) - 1 AS visit_order,
                a.admittime AS time, {", ".join(selects)},
                {age} AS age_raw, p.gender AS gender, a.ethnicity AS ethnicity, {los} AS los_raw
            FROM visits s JOIN adm a USING (subject_id, hadm_id) LEFT JOIN pat p ON p.subject_id = a.subject_id
            {" ".join(joins)}
            ORDER BY patient_id, visit_order"""
        ).df()
        self._finish_fields(frame)
        names = [self.medication_names.get(code, code) for code in vocab["medication"]]
        ddi = self.ddi_pairs(vocab["medication"])
        cohort = Cohort(
            visits=frame,
            vocab=vocab,
            ddi_pairs=ddi,
            smiles={code: self.smiles[code] for code in vocab["medication"] if code in self.smiles},
            # DPR reads adverse DDI as antagonism, as the benchmark importer does.
            relations=pd.DataFrame(
                [(a, b, "antagonism", "both") for a, b in ddi], columns=["drug_a", "drug_b", "relation", "direction"]
            ),
            medication_names=names,
            source=f"{self.layout}:{self.root.name}",
        )
        return cohort

    def _finish_fields(self, frame: pd.DataFrame) -> None:
        for column in ("diagnoses", "procedures", "medications", "labs"):
            frame[column] = [np.asarray(v, dtype=np.int64).tolist() for v in frame[column]]
        age = frame.pop("age_raw").astype(float)
        capped = age > self.options.age_cap
        invalid = age < 0
        if capped.any():
            self.note(
                f"age: {int(capped.sum())} visit(s) of {frame.loc[capped, 'patient_id'].nunique()} patient(s) above "
                f"{self.options.age_cap:g} (MIMIC's shifted/grouped oldest patients) set to {self.options.age_cap:g}"
            )
        frame["age"] = age.clip(upper=self.options.age_cap).where(~invalid)
        los = frame.pop("los_raw").astype(float)
        if (los < 0).any():
            self.note(f"length of stay: {int((los < 0).sum())} visit(s) discharged before admission set to NaN")
        frame["los"] = los.where(los >= 0)
        self.report["fields"] = {
            "age_capped_visits": int(capped.sum()),
            "age_missing_visits": int(frame["age"].isna().sum()),
            "los_missing_visits": int(frame["los"].isna().sum()),
            "los_days_median": None if frame["los"].isna().all() else round(float(frame["los"].median()), 3),
            "age_median": None if frame["age"].isna().all() else round(float(frame["age"].median()), 1),
        }
        if frame["ethnicity"].isna().all():
            frame.drop(columns="ethnicity", inplace=True)

    def ddi_pairs(self, medications: list[str]) -> list[tuple[str, str]]:
        ddi, cid_atc = self.mapping_files.get("ddi"), self.mapping_files.get("drug_atc")
        matrix = self.mapping_files.get("ddi_matrix")
        if (ddi is None or cid_atc is None) and matrix is not None:
            pairs, report = drug_knowledge.ddi_matrix_pairs(
                matrix, self.mapping_files.get("ddi_vocabulary"), medications
            )
            self.report["ddi"] = {"source": str(matrix), **report}
            return pairs
        if ddi is None or cid_atc is None:
            missing = [k for k, p in (("ddi", ddi), ("drug_atc", cid_atc)) if p is None]
            names = " / ".join(mappings.MAPPING_FILES[k][0] for k in missing)
            hint = mappings.option_hint(tuple(missing), self.options.options_from)
            self.note(
                f"no {names} (or a processed ddi_A_final.pkl + voc_final.pkl): the cohort has no DDI pairs, "
                f"which SafeDrug and GAMENet's DDI loss need; {hint}"
            )
            return []
        self.reading = ddi
        pairs, report = drug_knowledge.twosides_ddi_pairs(
            self.con, ddi, cid_atc, medications, self.options.ddi_side_effects, self.options.ddi_keep
        )
        self.report["ddi"] = {"source": str(ddi), **report}
        return pairs
