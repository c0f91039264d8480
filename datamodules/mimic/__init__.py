"""Raw MIMIC-III / MIMIC-IV -> cohort ETL (DuckDB, out of core) with its drug knowledge files.

``etl`` (entry points and the cache: ``prepare_cohort``), ``options`` (``EtlOptions``),
``pipeline`` (the rules, in order: ``build_cohort``), whose steps are ``readers`` (admissions,
patients, diagnosis/procedure codes, labs), ``prescriptions`` (NDC -> ATC3, top drugs, SMILES)
and ``assembly`` (vocabularies, visits, DDI), sharing one ``session``; ``tables`` (where the raw
tables are, how their columns are spelled), ``mappings`` (NDC -> ATC3, ICD maps, where mapping
files are looked for), ``drug_knowledge`` (TWOSIDES DDI, DrugBank SMILES), ``cli``
(``medrec-prepare``).
"""

from datamodules.mimic.etl import ETL_VERSION, EtlOptions, build_cohort, prepare_cohort, read_etl_report
from datamodules.mimic.tables import detect_layout

__all__ = ["ETL_VERSION", "EtlOptions", "build_cohort", "detect_layout", "prepare_cohort", "read_etl_report"]
