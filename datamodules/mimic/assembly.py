"""The selected admissions -> the cohort: vocabularies, one row per visit, patient fields, DDI.

Reads the temp tables the earlier steps left (``visits``, ``adm``, ``pat``, ``diagnoses``,
``procedures``, ``med``, ``labs``). Vocabularies are ordered by frequency (visits holding the
code), ties by code; visits by admission time within a patient.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.cohort import Cohort, CohortError
from datamodules.mimic import drug_knowledge, mappings
from datamodules.mimic.session import BIGINT, TIMESTAMP, EtlSession


def assemble(etl: EtlSession, medication_names: dict[str, str], smiles: dict[str, list[str]]) -> Cohort:
    """The cohort of the admissions in ``visits``, with the classes' display names and SMILES."""
    etl.reading = None
    vocab = {
        "diagnosis": vocabulary(etl, "diagnoses"),
        "procedure": vocabulary(etl, "procedures"),
        "medication": vocabulary(etl, "med"),
        "lab": vocabulary(etl, "labs"),
    }
    lists = {
        "diagnoses": "diagnoses",
        "procedures": "procedures",
        "medications": "med",
        "labs": "labs",
    }
    joins, selects = [], []
    for column, table in lists.items():
        etl.sql(
            f"""CREATE TEMP TABLE {table}_lists AS SELECT f.hadm_id, list(v.idx ORDER BY v.idx) AS codes
            FROM {table}_final f JOIN {table}_vocab v USING (token) GROUP BY f.hadm_id"""
        )
        joins.append(f"LEFT JOIN {table}_lists {table}_l ON {table}_l.hadm_id = a.hadm_id")
        selects.append(f"coalesce({table}_l.codes, []::BIGINT[]) AS {column}")

    los, icu_join = length_of_stay(etl)
    joins += icu_join
    if etl.layout == "mimic3":
        age = "(epoch(a.admittime) - epoch(p.dob)) / (365.25 * 86400.0)"
    else:
        age = "p.anchor_age + (year(a.admittime) - p.anchor_year)"
    width = int(etl.scalar("SELECT max(length(subject_id::VARCHAR)) FROM visits"))
    frame = etl.sql(
        f"""SELECT lpad(a.subject_id::VARCHAR, {width}, '0') AS patient_id, a.hadm_id::VARCHAR AS visit_id,
            (row_number() OVER (PARTITION BY a.subject_id ORDER BY a.admittime, a.hadm_id)) - 1 AS visit_order,
            a.admittime AS time, {", ".join(selects)},
            {age} AS age_raw, p.gender AS gender, a.ethnicity AS ethnicity, {los} AS los_raw
        FROM visits s JOIN adm a USING (subject_id, hadm_id) LEFT JOIN pat p ON p.subject_id = a.subject_id
        {" ".join(joins)}
        ORDER BY patient_id, visit_order"""
    ).df()
    finish_fields(etl, frame)
    names = [medication_names.get(code, code) for code in vocab["medication"]]
    ddi = ddi_pairs(etl, vocab["medication"])
    cohort = Cohort(
        visits=frame,
        vocab=vocab,
        ddi_pairs=ddi,
        smiles={code: smiles[code] for code in vocab["medication"] if code in smiles},
        # DPR reads adverse DDI as antagonism, as the benchmark importer does.
        relations=pd.DataFrame(
            [(a, b, "antagonism", "both") for a, b in ddi], columns=["drug_a", "drug_b", "relation", "direction"]
        ),
        medication_names=names,
        source=f"{etl.layout}:{etl.root.name}",
    )
    return cohort


def length_of_stay(etl: EtlSession) -> tuple[str, list[str]]:
    """SQL of the visit's length of stay in days and the joins it needs: discharge - admission,
    or with ``los_source="icu"`` the sum of the admission's ICU stays (NULL without one)."""
    if etl.options.los_source != "icu":
        return "(epoch(a.dischtime) - epoch(a.admittime)) / 86400.0", []
    icu = etl.tables.get("icustays")
    if icu is None:
        raise CohortError(f"{etl.root}: los_source='icu' needs the ICUSTAYS table, which is missing")
    etl.reading = icu.path
    etl.sql(
        f"""CREATE TEMP TABLE icu AS SELECT hadm_id, sum(epoch(outtime) - epoch(intime)) / 86400.0 AS days
        FROM (SELECT {BIGINT.format(icu.col("hadm_id"))} AS hadm_id,
                     {TIMESTAMP.format(icu.col("intime"))} AS intime,
                     {TIMESTAMP.format(icu.col("outtime"))} AS outtime FROM {icu.scan()})
        WHERE hadm_id IS NOT NULL GROUP BY hadm_id"""
    )
    return "icu.days", ["LEFT JOIN icu ON icu.hadm_id = a.hadm_id"]


def vocabulary(etl: EtlSession, table: str) -> list[str]:
    """Codes of ``table`` within the final visits, most frequent (by visits) first; indexes them."""
    etl.sql(
        f"""CREATE TEMP TABLE {table}_final AS SELECT DISTINCT x.hadm_id, x.token
        FROM {table} x SEMI JOIN visits USING (subject_id, hadm_id)"""
    )
    etl.sql(
        f"""CREATE TEMP TABLE {table}_vocab AS SELECT token, (row_number() OVER (ORDER BY count(*) DESC, token)) - 1
        AS idx FROM {table}_final GROUP BY token"""
    )
    return [tok for (tok,) in etl.sql(f"SELECT token FROM {table}_vocab ORDER BY idx").fetchall()]


def finish_fields(etl: EtlSession, frame: pd.DataFrame) -> None:
    """Code lists as plain int lists; ages capped at ``age_cap`` (negative: unknown), negative
    lengths of stay unknown, counted in the report's ``fields``."""
    for column in ("diagnoses", "procedures", "medications", "labs"):
        frame[column] = [np.asarray(v, dtype=np.int64).tolist() for v in frame[column]]
    age = frame.pop("age_raw").astype(float)
    capped = age > etl.options.age_cap
    invalid = age < 0
    if capped.any():
        etl.note(
            f"age: {int(capped.sum())} visit(s) of {frame.loc[capped, 'patient_id'].nunique()} patient(s) above "
            f"{etl.options.age_cap:g} (MIMIC's shifted/grouped oldest patients) set to {etl.options.age_cap:g}"
        )
    frame["age"] = age.clip(upper=etl.options.age_cap).where(~invalid)
    los = frame.pop("los_raw").astype(float)
    if (los < 0).any():
        etl.note(f"length of stay: {int((los < 0).sum())} visit(s) discharged before admission set to NaN")
    frame["los"] = los.where(los >= 0)
    etl.report["fields"] = {
        "age_capped_visits": int(capped.sum()),
        "age_missing_visits": int(frame["age"].isna().sum()),
        "los_missing_visits": int(frame["los"].isna().sum()),
        "los_days_median": None if frame["los"].isna().all() else round(float(frame["los"].median()), 3),
        "age_median": None if frame["age"].isna().all() else round(float(frame["age"].median()), 1),
    }
    if frame["ethnicity"].isna().all():
        frame.drop(columns="ethnicity", inplace=True)


def ddi_pairs(etl: EtlSession, medications: list[str]) -> list[tuple[str, str]]:
    """Adverse pairs among ``medications`` from TWOSIDES (+ drug-atc.csv) or a processed matrix."""
    ddi, cid_atc = etl.mapping_files.get("ddi"), etl.mapping_files.get("drug_atc")
    matrix = etl.mapping_files.get("ddi_matrix")
    if (ddi is None or cid_atc is None) and matrix is not None:
        pairs, report = drug_knowledge.ddi_matrix_pairs(matrix, etl.mapping_files.get("ddi_vocabulary"), medications)
        etl.report["ddi"] = {"source": str(matrix), **report}
        return pairs
    if ddi is None or cid_atc is None:
        missing = [k for k, p in (("ddi", ddi), ("drug_atc", cid_atc)) if p is None]
        names = " / ".join(mappings.MAPPING_FILES[k][0] for k in missing)
        hint = mappings.option_hint(tuple(missing), etl.options.options_from)
        etl.note(
            f"no {names} (or a processed ddi_A_final.pkl + voc_final.pkl): the cohort has no DDI pairs, "
            f"which SafeDrug and GAMENet's DDI loss need; {hint}"
        )
        return []
    etl.reading = ddi
    pairs, report = drug_knowledge.twosides_ddi_pairs(
        etl.con, ddi, cid_atc, medications, etl.options.ddi_side_effects, etl.options.ddi_keep
    )
    etl.report["ddi"] = {"source": str(ddi), **report}
    return pairs
