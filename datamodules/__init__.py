"""Data: cohort format, sources (synthetic, benchmark, raw MIMIC), LightningDataModules.

Exports are imported lazily so that data-only tools (``medrec-prepare``) do not pay for
importing torch and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "Cohort": "datamodules.cohort",
    "CohortError": "datamodules.cohort",
    "MedRecError": "datamodules.errors",
    "CohortKnowledge": "datamodules.knowledge",
    "SyntheticSpec": "datamodules.synthetic",
    "generate_synthetic_cohort": "datamodules.synthetic",
    "VisitSequenceDataModule": "datamodules.visit_sequence",
    "PackageGraphDataModule": "datamodules.package_graph",
    "PackageKnowledge": "datamodules.package_graph",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
