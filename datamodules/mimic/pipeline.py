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

import os
import time
from pathlib import Path

import duckdb

from datamodules.cohort import Cohort, CohortError
from datamodules.mimic import mappings
from datamodules.mimic.assembly import assemble
from datamodules.mimic.options import EtlOptions
from datamodules.mimic.prescriptions import load_prescriptions
from datamodules.mimic.readers import load_admissions, load_codes, load_labs, load_patients
from datamodules.mimic.session import EtlSession, duckdb_connection
from datamodules.mimic.tables import Layout, open_tables


def build_cohort(root: str | os.PathLike, layout: Layout, options: EtlOptions | None = None) -> tuple[Cohort, dict]:
    """Run the ETL; returns the cohort and its report (counts after every step)."""
    options = options or EtlOptions()
    root = Path(root)
    etl = None
    with duckdb_connection(options) as con:
        try:
            etl = open_session(con, root, layout, options)
            return run(etl)
        except duckdb.Error as err:
            where = (etl.reading if etl else None) or root
            raise CohortError(f"{where}: cannot be processed ({str(err).strip().splitlines()[0]})") from None


def open_session(con: duckdb.DuckDBPyConnection, root: Path, layout: Layout, options: EtlOptions) -> EtlSession:
    """Find the raw tables (only those the options use) and the mapping files."""
    unused = {"icustays": options.los_source != "icu", "labevents": not options.labs}
    tables = open_tables(con, root, layout, tuple(name for name, skip in unused.items() if skip))
    files = mappings.find_mapping_files(root, options.explicit_mappings, options.mappings)
    return EtlSession(con, root, layout, options, tables, files)


def run(etl: EtlSession) -> tuple[Cohort, dict]:
    """The steps of the module docstring, in order."""
    started = time.perf_counter()
    options = etl.options
    load_admissions(etl)
    load_patients(etl)
    medication_names, smiles = load_prescriptions(etl)
    load_codes(etl, "diagnoses", options.top_diagnoses, options.diagnosis_icd_map)
    load_codes(etl, "procedures", options.top_procedures, options.procedure_icd_map)
    select_admissions(etl)
    load_labs(etl)
    cohort = assemble(etl, medication_names, smiles)
    etl.report["cohort"] = cohort.summary()
    etl.report["seconds"] = round(time.perf_counter() - started, 2)
    return cohort.validate(where=f"{etl.layout} ETL of {etl.root}"), etl.report


def select_admissions(etl: EtlSession) -> None:
    """``visits``: the admissions with kept drugs (``s4``) that have diagnoses and procedures,
    then (``min_admissions_stage="final"``) of patients with enough of them."""
    etl.reading = None
    etl.sql("CREATE TEMP TABLE s5 AS SELECT * FROM s4 SEMI JOIN diagnoses USING (subject_id, hadm_id)")
    etl.step("with_diagnoses", "s5")
    etl.sql("CREATE TEMP TABLE s6 AS SELECT * FROM s5 SEMI JOIN procedures USING (subject_id, hadm_id)")
    etl.step("with_procedures", "s6")
    if etl.options.min_admissions_stage == "final":
        etl.min_admissions("visits", "s6")
        etl.step("final_min_admissions", "visits")
    else:
        etl.sql("CREATE TEMP TABLE visits AS SELECT * FROM s6")
