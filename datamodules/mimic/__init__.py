"""Raw MIMIC-III / MIMIC-IV -> cohort ETL (DuckDB, out of core) with its drug knowledge files.

``tables`` (where the raw tables are, which columns), ``mappings`` (NDC -> ATC3, ICD maps,
where mapping files are looked for), ``drug_knowledge`` (TWOSIDES DDI, DrugBank SMILES),
``etl`` (the rules, the options, the cache), ``cli`` (``medrec-prepare``).
"""

from datamodules.mimic.etl import ETL_VERSION, EtlOptions, build_cohort, prepare_cohort, read_etl_report
from datamodules.mimic.tables import detect_layout

__all__ = ["ETL_VERSION", "EtlOptions", "build_cohort", "detect_layout", "prepare_cohort", "read_etl_report"]
