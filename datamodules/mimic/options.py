"""The options of the raw MIMIC ETL (``medrec-prepare`` flags, ``--data.init_args.*`` in train.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from datamodules.mimic import mappings


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
