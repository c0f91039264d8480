"""PRESCRIPTIONS -> the medication of each admission as ATC3 classes (steps 2-5 of the ETL).

``load_prescriptions`` runs, in order:

1. ``read_prescriptions``: parse the table; NDCs normalised to 11 digits, missing/non-numeric/
   all-zero ones unusable (temp table ``rx``).
2. ``keep_prescribed``: admissions with a usable NDC (optionally started within the first
   ``drug_window_hours``), then the ``min_admissions`` rule when it applies to prescriptions
   (``rxv``; steps ``prescribed`` / ``min_admissions``, admissions in ``s2``).
3. ``map_to_atc3``: NDC -> ATC3 (``mappings.ndc_to_atc3``); unmapped rows dropped and counted
   in the report's ``drug_mapping`` (``rxm``; step ``drug_mapped``).
4. ``keep_top_drugs``: the ``top_medications`` most frequent classes, those without a molecule
   dropped when ``require_smiles`` (``med`` with one row per admission and class; step
   ``top_drugs``, admissions in ``s4``).
"""

from __future__ import annotations

import pandas as pd

from datamodules.cohort import CohortError
from datamodules.mimic import drug_knowledge, mappings
from datamodules.mimic.session import BIGINT, TIMESTAMP, EtlSession, bad


def load_prescriptions(etl: EtlSession) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Run the four steps; returns each kept class's display name and its SMILES."""
    read_prescriptions(etl)
    keep_prescribed(etl)
    map_to_atc3(etl)
    return keep_top_drugs(etl)


def read_prescriptions(etl: EtlSession) -> None:
    """Temp table ``rx`` (subject_id, hadm_id, start, drug, ndc, n): the distinct parsed rows."""
    t = etl.tables["prescriptions"]
    etl.reading = t.path
    s, h, st, nd = (t.col(c) for c in ("subject_id", "hadm_id", "start", "ndc"))
    ndc_text = f"regexp_replace(trim({nd}), '\\.0$', '')"
    ndc = (
        f"CASE WHEN regexp_full_match({ndc_text}, '[0-9]{{1,11}}') AND lpad({ndc_text}, 11, '0') <> "
        f"'00000000000' THEN lpad({ndc_text}, 11, '0') END"
    )
    etl.sql(
        f"""CREATE TEMP TABLE rx AS
        SELECT subject_id, hadm_id, start, drug, ndc, bad_start, count(*) AS n FROM (
            SELECT {BIGINT.format(s)} AS subject_id, {BIGINT.format(h)} AS hadm_id,
                   {TIMESTAMP.format(st)} AS start, nullif(trim({t.col("drug")}), '') AS drug, {ndc} AS ndc,
                   {bad(st, TIMESTAMP.format(st))} AS bad_start
            FROM {t.scan()})
        GROUP BY ALL"""
    )
    rows = etl.require_rows(t, "rx")
    etl.check_parsed(t, "rx", "start", "date")
    no_ndc = int(etl.scalar("SELECT coalesce(sum(n), 0) FROM rx WHERE ndc IS NULL"))
    no_ids = int(etl.scalar("SELECT coalesce(sum(n), 0) FROM rx WHERE hadm_id IS NULL OR subject_id IS NULL"))
    etl.table_stats("prescriptions", t, "rx", rows_without_usable_ndc=no_ndc, rows_without_ids=no_ids)
    if no_ndc == rows:
        raise CohortError(f"{t.path}: no row has a usable NDC (all missing, zero or non-numeric)")


def keep_prescribed(etl: EtlSession) -> None:
    """``rxv``: rows with a usable NDC of a known admission (within the drug window); ``s2``: their
    admissions, of patients with enough of them when ``min_admissions_stage`` is ``prescriptions``."""
    window = ""
    hours = etl.options.drug_window_hours
    if hours is not None:
        window = f"AND r.start IS NOT NULL AND r.start < a.admittime + to_microseconds({int(hours * 3.6e9)})"
    etl.sql(
        f"""CREATE TEMP TABLE rxv AS
        SELECT r.subject_id, r.hadm_id, r.start, r.drug, r.ndc, r.n
        FROM rx r JOIN adm a USING (subject_id, hadm_id) WHERE r.ndc IS NOT NULL {window}"""
    )
    etl.sql("DROP TABLE rx")
    etl.sql("CREATE TEMP TABLE s1 AS SELECT DISTINCT subject_id, hadm_id FROM rxv")
    etl.step("prescribed" if hours is None else f"prescribed_first_{hours:g}h", "s1")
    if etl.options.min_admissions_stage == "prescriptions":
        etl.min_admissions("s2", "s1")
        etl.step("min_admissions", "s2")
    else:
        etl.sql("CREATE TEMP TABLE s2 AS SELECT * FROM s1")


def map_to_atc3(etl: EtlSession) -> None:
    """``rxm`` (subject_id, hadm_id, start, drug, atc3): the mapped rows of ``s2``'s admissions,
    de-duplicated on those columns as the reference counts drug frequency over them."""
    table = etl.tables["prescriptions"].path
    ndc_map, source = mappings.ndc_to_atc3(etl.mapping_files, etl.options.explicit_mappings, etl.options.options_from)
    etl.register("ndc_map", ndc_map)
    total, mapped, ndcs, mapped_ndcs = etl.row(
        """SELECT coalesce(sum(n), 0), coalesce(sum(n) FILTER (WHERE m.atc3 IS NOT NULL), 0),
                  count(DISTINCT r.ndc), count(DISTINCT r.ndc) FILTER (WHERE m.atc3 IS NOT NULL)
           FROM rxv r JOIN s2 USING (subject_id, hadm_id) LEFT JOIN ndc_map m USING (ndc)"""
    )
    top_unmapped = etl.sql(
        """SELECT r.ndc, sum(n) AS rows FROM rxv r JOIN s2 USING (subject_id, hadm_id)
           WHERE r.ndc NOT IN (SELECT ndc FROM ndc_map) GROUP BY r.ndc ORDER BY rows DESC, r.ndc LIMIT 10"""
    ).fetchall()
    etl.report["drug_mapping"] = {
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
            f"{source['source']}: the drug mapping maps none of the {ndcs} distinct NDCs in {table.name} "
            f"(e.g. {examples}); check the mapping files belong to this data"
        )
    etl.note(
        f"drug mapping: {total - mapped} of {total} prescription rows "
        f"({100 * (total - mapped) / total:.1f} %) have an NDC without ATC code and are dropped"
    )
    etl.sql(
        """CREATE TEMP TABLE rxm AS
        SELECT r.subject_id, r.hadm_id, r.start, r.drug, m.atc3
        FROM rxv r JOIN s2 USING (subject_id, hadm_id) JOIN ndc_map m USING (ndc) GROUP BY ALL"""
    )
    etl.sql("DROP TABLE rxv")
    etl.sql("CREATE TEMP TABLE s3 AS SELECT DISTINCT subject_id, hadm_id FROM rxm")
    etl.step("drug_mapped", "s3")


def keep_top_drugs(etl: EtlSession) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``med`` (subject_id, hadm_id, token): each admission's kept ATC3 classes; returns each
    class's most prescribed drug name (its display name) and the SMILES found for the classes."""
    limit = f"LIMIT {etl.options.top_medications}" if etl.options.top_medications else ""
    etl.sql(
        f"CREATE TEMP TABLE top_drugs AS SELECT atc3, count(*) AS rows FROM rxm GROUP BY atc3 "
        f"ORDER BY rows DESC, atc3 {limit}"
    )
    names = etl.sql(
        """SELECT atc3, lower(drug) AS name, count(*) AS rows, any_value(drug) AS spelling FROM rxm
           WHERE atc3 IN (SELECT atc3 FROM top_drugs) AND drug IS NOT NULL GROUP BY atc3, lower(drug)"""
    ).df()
    medication_names = (
        names.sort_values(["atc3", "rows", "name"], ascending=[True, False, True])
        .drop_duplicates("atc3")
        .set_index("atc3")["spelling"]
        .to_dict()
    )
    kept = [a for (a,) in etl.sql("SELECT atc3 FROM top_drugs ORDER BY atc3").fetchall()]
    smiles = load_smiles(etl, names)
    if smiles is not None:
        kept = drop_classes_without_smiles(etl, kept, smiles)
    etl.sql("CREATE TEMP TABLE kept_drugs (atc3 VARCHAR)")
    etl.sql("INSERT INTO kept_drugs SELECT unnest(?::VARCHAR[])", [kept])
    etl.sql(
        "CREATE TEMP TABLE med AS SELECT DISTINCT subject_id, hadm_id, atc3 AS token FROM rxm "
        "WHERE atc3 IN (SELECT atc3 FROM kept_drugs)"
    )
    etl.sql("DROP TABLE rxm")
    etl.sql("CREATE TEMP TABLE s4 AS SELECT DISTINCT subject_id, hadm_id FROM med")
    etl.step("top_drugs", "s4")
    return medication_names, smiles or {}


def load_smiles(etl: EtlSession, names: pd.DataFrame) -> dict[str, list[str]] | None:
    """SMILES per ATC3 class from DrugBank (matched by the classes' drug ``names``) or else a
    processed ATC3 -> SMILES pickle; None (and a note) without either."""
    drugbank, processed = etl.mapping_files.get("drugbank"), etl.mapping_files.get("smiles")
    if drugbank is not None:
        return drug_knowledge.smiles_per_class(
            names, drug_knowledge.read_drugbank_smiles(drugbank), etl.options.smiles_per_drug
        )
    if processed is not None:
        return drug_knowledge.read_smiles_pickle(processed, etl.options.smiles_per_drug)
    hint = mappings.option_hint(("drugbank",), etl.options.options_from)
    etl.note(
        "no drugbank_drugs_info.csv (or atc3toSMILES.pkl / idx2drug.pkl): the cohort has no SMILES, "
        f"which SafeDrug needs; {hint}"
    )
    return None


def drop_classes_without_smiles(etl: EtlSession, kept: list[str], smiles: dict[str, list[str]]) -> list[str]:
    """Report the classes without a molecule; drop them when ``require_smiles`` (the reference)."""
    source = etl.mapping_files.get("drugbank") or etl.mapping_files.get("smiles")
    without = [a for a in kept if a not in smiles]
    etl.report["smiles"] = {
        "source": str(source),
        "classes_with_smiles": len(kept) - len(without),
        "classes_without_smiles": without,
    }
    if etl.options.require_smiles and without:
        etl.note(f"{len(without)} ATC3 class(es) without a molecule in {source.name} dropped: {without[:20]}")
        kept = [a for a in kept if a in smiles]
    return kept
