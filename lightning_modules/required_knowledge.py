"""Knowledge a model cannot do without: refuse a cohort that lacks it, say how to supply it.

Molecules are checked by :func:`datamodules.molecules.molecule_coverage`; this module checks
the adverse DDI pairs that a DDI-controlled fit (SafeDrug's PID controller, GAMENet's DDI-loss
switch) steers by. Without any pair the controller has nothing to act on and the fit would be
the unconstrained model under the method's name.
"""

from __future__ import annotations

import logging

from datamodules.cohort import CohortError
from datamodules.knowledge import CohortKnowledge
from datamodules.molecules import KNOWLEDGE_SECTION

log = logging.getLogger(__name__)

DDI_SOURCES = (
    "TWOSIDES drug-DDI.csv with drug-atc.csv (or a processed ddi_A_final.pkl with its voc_final.pkl) in the "
    "mappings folder when the cohort is built from raw MIMIC, or ddi_pairs in the cohort"
)


def require_ddi_pairs(knowledge: CohortKnowledge, by: str, allow_none: bool) -> None:
    """Raise a CohortError when ``knowledge`` has no adverse DDI pair (warn instead if ``allow_none``)."""
    if (knowledge.ddi_adj != 0).any():
        return
    if not allow_none:
        raise CohortError(
            f"{by} controls the DDI rate, but {knowledge.source} has no adverse DDI pairs: supply {DDI_SOURCES} "
            f"(see {KNOWLEDGE_SECTION}), or pass --model.init_args.allow_no_ddi=true to train without DDI control"
        )
    log.warning("%s: %s has no adverse DDI pairs; the DDI control has nothing to act on", by, knowledge.source)
