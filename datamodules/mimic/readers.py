"""Raw MIMIC tables -> typed DuckDB temp tables, with the checks and counts of the ETL report.

Each reader parses one table's text columns (ids, times, numbers; a non-empty value that does
not parse is an error naming the file and column), removes duplicated rows (counted per
table) and leaves a temp table for the later steps:

- ``adm`` (subject_id, hadm_id, admittime, dischtime, ethnicity) and ``s0``: admissions;
- ``pat`` (subject_id, gender, dob, anchor_age, anchor_year): patients;
- ``diagnoses`` / ``procedures`` (subject_id, hadm_id, token): the ``top`` most frequent codes;
- ``labs`` (subject_id, hadm_id, token): abnormal lab results of the selected ``visits``.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.cohort import CohortError
from datamodules.mimic import mappings
from datamodules.mimic.session import BIGINT, DOUBLE, TIMESTAMP, EtlSession, bad


def load_admissions(etl: EtlSession) -> None:
    t = etl.tables["admissions"]
    etl.reading = t.path
    s, h, a, d = (t.col(c) for c in ("subject_id", "hadm_id", "admittime", "dischtime"))
    etl.sql(
        f"""CREATE TEMP TABLE adm_raw AS
        SELECT subject_id, hadm_id, admittime, dischtime, ethnicity,
               bad_subject_id, bad_hadm_id, bad_admittime, bad_dischtime, count(*) AS n
        FROM (SELECT {BIGINT.format(s)} AS subject_id, {BIGINT.format(h)} AS hadm_id,
                     {TIMESTAMP.format(a)} AS admittime, {TIMESTAMP.format(d)} AS dischtime,
                     nullif(trim({t.col("ethnicity")}), '') AS ethnicity,
                     {bad(s, BIGINT.format(s))} AS bad_subject_id, {bad(h, BIGINT.format(h))} AS bad_hadm_id,
                     {bad(a, TIMESTAMP.format(a))} AS bad_admittime,
                     {bad(d, TIMESTAMP.format(d))} AS bad_dischtime
              FROM {t.scan()})
        GROUP BY ALL"""
    )
    etl.require_rows(t, "adm_raw")
    etl.check_parsed(t, "adm_raw", "subject_id", "integer")
    etl.check_parsed(t, "adm_raw", "hadm_id", "integer")
    etl.check_parsed(t, "adm_raw", "admittime", "date")
    etl.check_parsed(t, "adm_raw", "dischtime", "date")
    missing = etl.scalar(
        "SELECT coalesce(sum(n), 0) FROM adm_raw WHERE hadm_id IS NULL OR subject_id IS NULL OR admittime IS NULL"
    )
    etl.table_stats("admissions", t, "adm_raw", rows_without_ids_or_admittime=int(missing))
    etl.sql(
        "CREATE TEMP TABLE adm AS SELECT subject_id, hadm_id, admittime, dischtime, ethnicity FROM adm_raw "
        "WHERE hadm_id IS NOT NULL AND subject_id IS NOT NULL AND admittime IS NOT NULL"
    )
    clash = etl.row("SELECT hadm_id, count(*) FROM adm GROUP BY hadm_id HAVING count(*) > 1 LIMIT 1")
    if clash:
        raise CohortError(
            f"{t.path}: hadm_id {clash[0]} occurs {clash[1]} times with different values; an admission must be one row"
        )
    etl.sql("CREATE TEMP TABLE s0 AS SELECT subject_id, hadm_id FROM adm")
    etl.step("admissions", "s0")


def load_patients(etl: EtlSession) -> None:
    t = etl.tables["patients"]
    etl.reading = t.path
    s, g = t.col("subject_id"), t.col("gender")
    if etl.layout == "mimic3":
        dob = t.col("dob")
        parsed = (
            f"{TIMESTAMP.format(dob)} AS dob, NULL::DOUBLE AS anchor_age, NULL::DOUBLE AS anchor_year, "
            f"{bad(dob, TIMESTAMP.format(dob))} AS bad_dob"
        )
        checks = [("dob", "date")]
    else:
        aa, ay = t.col("anchor_age"), t.col("anchor_year")
        parsed = (
            f"NULL::TIMESTAMP AS dob, {DOUBLE.format(aa)} AS anchor_age, {DOUBLE.format(ay)} AS anchor_year, "
            f"{bad(aa, DOUBLE.format(aa))} AS bad_anchor_age, {bad(ay, DOUBLE.format(ay))} AS bad_anchor_year"
        )
        checks = [("anchor_age", "number"), ("anchor_year", "number")]
    etl.sql(
        f"""CREATE TEMP TABLE pat_raw AS
        SELECT *, count(*) AS n FROM (
            SELECT {BIGINT.format(s)} AS subject_id, upper(nullif(trim({g}), '')) AS gender, {parsed},
                   {bad(s, BIGINT.format(s))} AS bad_subject_id
            FROM {t.scan()})
        GROUP BY ALL"""
    )
    etl.require_rows(t, "pat_raw")
    etl.check_parsed(t, "pat_raw", "subject_id", "integer")
    for column, what in checks:
        etl.check_parsed(t, "pat_raw", column, what)
    etl.table_stats("patients", t, "pat_raw")
    etl.sql(
        "CREATE TEMP TABLE pat AS SELECT subject_id, any_value(gender) AS gender, any_value(dob) AS dob, "
        "any_value(anchor_age) AS anchor_age, any_value(anchor_year) AS anchor_year, count(*) AS versions "
        "FROM pat_raw WHERE subject_id IS NOT NULL GROUP BY subject_id"
    )
    clash = etl.row("SELECT subject_id FROM pat WHERE versions > 1 LIMIT 1")
    if clash:
        raise CohortError(f"{t.path}: subject_id {clash[0]} occurs more than once with different values")


def load_codes(etl: EtlSession, name: str, top: int | None, icd_map: str | None) -> None:
    """Diagnosis or procedure codes (``name``); MIMIC-IV codes become ``version:code`` tokens,
    ICD-9 ones mapped to ICD-10 first when ``icd_map`` is given."""
    t = etl.tables[name]
    etl.reading = t.path
    s, h, c = t.col("subject_id"), t.col("hadm_id"), t.col("code")
    code = f"nullif(trim({c}), '')"
    join = ""
    if etl.layout == "mimic4":
        version = f"trim({t.col('version')})"
        mapped = code
        if icd_map:
            frame = mappings.read_icd_map(Path(icd_map).expanduser())
            etl.register(f"{name}_icd_map", frame)
            join = f"LEFT JOIN {name}_icd_map m ON {version} = '9' AND m.source = {code}"
            mapped = f"coalesce(m.target, {code})"
            version = f"CASE WHEN m.target IS NOT NULL THEN '10' ELSE {version} END"
        token = f"{version} || ':' || {mapped}" if etl.options.icd_version_tokens else mapped
        code = f"CASE WHEN {code} IS NOT NULL THEN {token} END"
    etl.sql(
        f"""CREATE TEMP TABLE {name}_raw AS
        SELECT subject_id, hadm_id, token, bad_subject_id, bad_hadm_id, count(*) AS n FROM (
            SELECT {BIGINT.format(s)} AS subject_id, {BIGINT.format(h)} AS hadm_id, {code} AS token,
                   {bad(s, BIGINT.format(s))} AS bad_subject_id, {bad(h, BIGINT.format(h))} AS bad_hadm_id
            FROM {t.scan()} {join})
        GROUP BY ALL"""
    )
    etl.require_rows(t, f"{name}_raw")
    for column in ("subject_id", "hadm_id"):  # a malformed id is an error, not a silently dropped row
        etl.check_parsed(t, f"{name}_raw", column, "integer id")
    unusable = "token IS NULL OR hadm_id IS NULL OR subject_id IS NULL"
    dropped = int(etl.scalar(f"SELECT coalesce(sum(n), 0) FROM {name}_raw WHERE {unusable}"))
    etl.table_stats(name, t, f"{name}_raw", rows_without_code_or_ids=dropped)
    etl.sql(f"DELETE FROM {name}_raw WHERE {unusable}")
    limit = f"LIMIT {top}" if top else ""
    etl.sql(
        f"""CREATE TEMP TABLE {name} AS SELECT subject_id, hadm_id, token FROM {name}_raw
        WHERE token IN (SELECT token FROM {name}_raw GROUP BY token ORDER BY count(*) DESC, token {limit})"""
    )
    etl.sql(f"DROP TABLE {name}_raw")


def load_labs(etl: EtlSession) -> None:
    """Abnormal results as ``itemid:high|low|abnormal`` tokens, read only for the final ``visits``."""
    t = etl.tables.get("labevents")
    etl.sql("CREATE TEMP TABLE labs (subject_id BIGINT, hadm_id BIGINT, token VARCHAR)")
    if not etl.options.labs:
        return
    if t is None:
        etl.note("no LABEVENTS table: the cohort has no labs")
        return
    etl.reading = t.path
    v, lo, hi = (DOUBLE.format(t.col(c)) for c in ("valuenum", "ref_range_lower", "ref_range_upper"))
    direction = (
        f"CASE WHEN {v} IS NOT NULL AND {lo} IS NOT NULL AND {hi} IS NOT NULL AND {hi} > {lo} "
        f"AND {v} > {hi} THEN 'high' "
        f"WHEN {v} IS NOT NULL AND {lo} IS NOT NULL AND {hi} IS NOT NULL AND {hi} > {lo} "
        f"AND {v} < {lo} THEN 'low' "
        f"WHEN lower(trim({t.col('flag')})) = 'abnormal' THEN 'abnormal' END"
    )
    etl.sql(
        f"""CREATE TEMP TABLE lab_raw AS
        SELECT hadm_id, itemid || ':' || direction AS token, count(*) AS n FROM (
            SELECT {BIGINT.format(t.col("hadm_id"))} AS hadm_id, {BIGINT.format(t.col("itemid"))} AS itemid,
                   {direction} AS direction
            FROM {t.scan()})
        WHERE hadm_id IN (SELECT hadm_id FROM visits) AND itemid IS NOT NULL AND direction IS NOT NULL
        GROUP BY ALL"""
    )
    rows = int(etl.scalar("SELECT coalesce(sum(n), 0) FROM lab_raw"))
    etl.report["tables"]["labevents"] = {"file": str(t.path), "abnormal_rows_in_cohort": rows}
    limit = f"LIMIT {etl.options.top_labs}" if etl.options.top_labs else ""
    etl.sql(
        f"""INSERT INTO labs SELECT v.subject_id, l.hadm_id, l.token FROM lab_raw l JOIN visits v USING (hadm_id)
        WHERE l.token IN (SELECT token FROM lab_raw GROUP BY token ORDER BY count(*) DESC, token {limit})"""
    )
    etl.sql("DROP TABLE lab_raw")
