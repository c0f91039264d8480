"""Data: cohort format, sources (synthetic, benchmark), LightningDataModules."""

from datamodules.cohort import Cohort, CohortError
from datamodules.knowledge import CohortKnowledge
from datamodules.synthetic import SyntheticSpec, generate_synthetic_cohort
from datamodules.visit_sequence import VisitSequenceDataModule

__all__ = [
    "Cohort",
    "CohortError",
    "CohortKnowledge",
    "SyntheticSpec",
    "generate_synthetic_cohort",
    "VisitSequenceDataModule",
]
